"""`python -m sidecar`: the same entry point as the `opus-sidecar` script."""

from __future__ import annotations

import sys

from sidecar.cli import main

sys.exit(main())
