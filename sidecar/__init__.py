"""Opus Mesh sidecar: the per-pod data plane of the mesh."""

__version__ = "0.1.0"
