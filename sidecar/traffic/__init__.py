"""Traffic management (docs/traffic.md): route rules' matching (`match`), weighted
destinations (`split`), the rule tables a handler routes with (`table`), and the
per-route steps a rule's chain may hold (`fault`, `mirror`).

A service with no rules pays for none of it: its calls never reach a table.
"""
