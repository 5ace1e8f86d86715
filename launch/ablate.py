"""Run the mFSR ablation rows and write a markdown table of their test scores.

The command lives in ``xmdist.cli.ablate``; ``--help`` lists its options.
"""
import sys

from xmdist.cli.ablate import main

if __name__ == "__main__":
    sys.exit(main())
