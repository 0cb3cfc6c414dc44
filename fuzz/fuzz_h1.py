"""atheris: H1ServerProtocol fed arbitrary bytes must not raise, hang, or hand the
handler a request with CR/LF/NUL in its target or headers."""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    from tests.fuzz.test_h1_fuzz import _clean, run


def one_input(data: bytes) -> None:
    seen, _, settled = run([data])
    assert settled, "the connection hung"
    for request in seen:
        _clean(request)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
