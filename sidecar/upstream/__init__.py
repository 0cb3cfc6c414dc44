"""Upstream side: connections to peers and the pools that share them."""
