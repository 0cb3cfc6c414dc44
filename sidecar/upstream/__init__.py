"""The client side of the proxy: connections to upstreams (peer sidecars, or the local app)
over HTTP/2 (h2c) or HTTP/1.1, the pools that share them, and `pool`, what every pool
offers the proxy core.
"""
