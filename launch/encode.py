"""Encode a shard split with a trained run into a retrieval index (see xmdist/tools/index.py).

The command lives in ``xmdist.cli.encode``; ``--help`` lists its options.
"""
import sys

from xmdist.cli.encode import main

if __name__ == "__main__":
    sys.exit(main())
