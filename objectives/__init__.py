"""masklab.objectives: backbone adapters, heads, losses and EMA teachers."""

__all__: list[str] = []
