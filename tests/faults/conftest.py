"""The integration tier's fixtures (real processes on 127.0.0.1), shared with this folder."""

from tests.integration.conftest import mesh

__all__ = ["mesh"]
