"""caddie stages: one module per pipeline stage (`python -m stages.<stage>`), plus shared modules."""
