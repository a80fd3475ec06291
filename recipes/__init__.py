"""masklab.recipes: training loops, configs, the command line and the demo."""

__all__: list[str] = []
