"""Built-in filters, one module per filter (the filter-chain issue fills this package)."""
