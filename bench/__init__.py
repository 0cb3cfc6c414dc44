"""Opus Mesh benchmarks: the sidecar against nginx, HAProxy and a direct call.

`python -m bench` (or `bench/run`) runs the suite on loopback and writes
docs/benchmarks.md; `--smoke` runs every case briefly, once. See docs/benchmarks.md.
"""
