"""masklab: masked self-supervised learning as composable, on-device data-pipeline stages.

Subpackages: :mod:`masklab.pipeline` (datasets, loaders, Batch, stage chain),
:mod:`masklab.transforms` (mask, view and mixing stages),
:mod:`masklab.objectives` (backbone adapters, heads, losses) and
:mod:`masklab.recipes` (Accelerate training loops, configs, CLI).
"""

__version__ = "0.1.0"
