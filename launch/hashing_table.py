"""Train DJSRH and SGRN at several code lengths (and SGRN's ablations) and tabulate test mAP.

The command lives in ``xmdist.cli.hashing_table``; ``--help`` lists its options.
"""
import sys

from xmdist.cli.hashing_table import main

if __name__ == "__main__":
    sys.exit(main())
