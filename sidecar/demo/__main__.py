"""`python -m sidecar.demo`: the same as `opus-sidecar demo`."""

from __future__ import annotations

import sys

from sidecar.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
