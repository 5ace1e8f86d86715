"""Benchmarks. Each prints one JSON object (rank 0); results go in BENCHMARKS.md with the machine named.

The command lives in ``xmdist.cli.bench``; ``--help`` lists its options.
"""
import sys

from xmdist.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
