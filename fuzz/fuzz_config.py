"""atheris: load_config on arbitrary bytes gives a SidecarConfig or a ConfigError."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    from sidecar.chain import validate_filters
    from sidecar.config import ConfigError, load_config

PATH = os.path.join(tempfile.mkdtemp(prefix="opus-fuzz-"), "config.yaml")


def one_input(data: bytes) -> None:
    with open(PATH, "wb") as fh:
        fh.write(data)
    with contextlib.suppress(ConfigError):
        validate_filters(load_config(PATH, environ={}))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
