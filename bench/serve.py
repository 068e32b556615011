"""Load generator for a running `starchat serve` (same as `starchat bench serve`); see starchat/bench/serve.py."""

import sys

from starchat.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
