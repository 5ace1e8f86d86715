"""Search an index written by launch/encode.py with a caption or an image.

The command lives in ``xmdist.cli.search``; ``--help`` lists its options.
"""
import sys

from xmdist.cli.search import main

if __name__ == "__main__":
    sys.exit(main())
