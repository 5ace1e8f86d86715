"""Evaluate a checkpoint of a run: metrics to JSON, metrics and retrieval examples to TensorBoard.

The command lives in ``xmdist.cli.eval``; ``--help`` lists its options.
"""
import sys

from xmdist.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
