"""Build an xmdist shard set (WebDataset tars + ``_info.json``, see shards/README.md).

The command lives in ``xmdist.cli.make_shards``; ``--help`` lists its options.
"""
import sys

from xmdist.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
