"""Experiments: the `molf compare` grid (budgets, cells, runner) and its report."""
