"""Encode the images of a shard set with a fixed CNN and write a *feature shard set*.

The command lives in ``xmdist.cli.extract_features``; ``--help`` lists its options.
"""
import sys

from xmdist.cli.extract_features import main

if __name__ == "__main__":
    sys.exit(main())
