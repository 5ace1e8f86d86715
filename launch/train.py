"""Train a retrieval model.

The command lives in ``xmdist.cli.train``; ``--help`` lists its options.
"""
import sys

from xmdist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
