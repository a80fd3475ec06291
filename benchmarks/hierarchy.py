"""EHM's region trees: masklab's batched build against a per-image loop, and the stage's share of a step.

Part 1, the tree build: greedy agglomerative merging of 4-adjacent regions
down to one root, for B images on a 14x14 grid (N = 196, 195 merges), from
a symmetric random affinity (the cost does not depend on the values).
Contenders, side by side in one process:

- masklab's ``region_tree``: every merge step for the whole batch at once;
- the same function called once per image (what batching buys);
- scikit-learn's ``AgglomerativeClustering`` (average linkage, precomputed
  distance ``max(S) - S``, a 4-neighbour connectivity graph), once per
  image: the obvious alternative, compiled code with a heap. It averages
  over connected pairs only, where masklab averages over all cell pairs of
  the two regions (METHODS.md), so it does less work per merge.

Part 2, the stage in a training step: ViT-tiny MAE at 224 px. One step
(forward, backward, AdamW) against the EHM stage for the same batch: the
teacher's affinity pass (all tokens, no grad) plus the tree to the level
in use at progress 0.5 and the mask.

Run: ``python benchmarks/hierarchy.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from _timing import Figures, add_json_argument, median_ms

from masklab.objectives import MAE, ViTBackbone
from masklab.pipeline import Batch
from masklab.transforms import HierarchicalMask, RandomMask, region_tree


def sklearn_trees(affinity: np.ndarray, grid: tuple[int, int]) -> None:
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.feature_extraction.image import grid_to_graph

    connectivity = grid_to_graph(*grid)
    for image in affinity:
        distance = image.max() - image
        np.fill_diagonal(distance, 0.0)
        AgglomerativeClustering(
            n_clusters=1,
            metric="precomputed",
            linkage="average",
            connectivity=connectivity,
            compute_full_tree=True,
        ).fit(distance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, a smaller training batch")
    parser.add_argument("--batch-size", type=int, default=256, help="images per tree build (default 256)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the trees, the model and the stage run (default cpu)")
    parser.add_argument("--step-batch-size", type=int, default=None, help="the training step's batch (16 / 64)")
    add_json_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    grid, batch = (14, 14), args.batch_size
    cells = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(batch, cells, cells, generator=generator)
    as_numpy = ((noise + noise.transpose(1, 2)) / 2).double().numpy()
    affinity = ((noise + noise.transpose(1, 2)) / 2).to(device)

    batched = median_ms(lambda: region_tree(affinity, grid), repeats)
    per_image = median_ms(lambda: [region_tree(affinity[i : i + 1], grid) for i in range(batch)], max(1, repeats // 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = median_ms(lambda: sklearn_trees(as_numpy, grid), max(1, repeats // 2))
    figures = Figures(
        "hierarchy",
        f"full trees (195 merges), B={batch}, 14x14 grid, {device}, {torch.get_num_threads()} torch threads",
    )
    figures.compare("region_tree batched vs one image at a time", batched, "same code per image", per_image, "ms")
    figures.compare(
        "region_tree batched vs scikit-learn", batched, "sklearn average linkage per image", reference, "ms"
    )
    print(f"hierarchy benchmark: {figures.setting}")
    print(f"{'method':>44} {'ms / batch':>11} {'vs masklab':>11}")
    for name, ms in (
        ("masklab region_tree, batched", batched),
        ("masklab region_tree, one image at a time", per_image),
        ("scikit-learn average linkage, per image", reference),
    ):
        print(f"{name:>44} {ms:>11.1f} {ms / batched:>10.2f}x")

    # Part 2: the stage's share of a ViT-tiny MAE training step at 224 px.
    step_batch = args.step_batch_size or (16 if args.quick else 64)
    torch.manual_seed(0)
    model = MAE(ViTBackbone.from_name("vit_tiny_patch16_224", img_size=224), teacher_decay=0.996).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(step_batch, 3, 224, 224, device=device)
    stage = HierarchicalMask(0.75, patch_size=16)
    stage.bind(model.guidance("affinity"))
    stage.set_progress(0.5)
    masked = RandomMask(0.75, 16)(Batch(images=images, seed=0))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(masked).loss.backward()
        optimizer.step()

    counter = iter(range(10**9))
    step_ms = median_ms(step, repeats)
    stage_ms = median_ms(lambda: stage(Batch(images=images, seed=next(counter))), repeats)
    teacher_affinity = stage.affinity(images)
    level = stage.num_regions(cells)
    tree_ms = median_ms(lambda: region_tree(teacher_affinity, grid, level), repeats)
    print(f"\nEHM stage in a ViT-tiny MAE step, B={step_batch}, 224 px, progress 0.5 ({level} regions):")
    print(f"  training step (forward, backward, AdamW): {step_ms:.0f} ms")
    print(
        f"  EHM stage: {stage_ms:.0f} ms ({100 * stage_ms / (step_ms + stage_ms):.1f}% of step + stage), of which the "
        f"tree build {tree_ms:.1f} ms ({100 * tree_ms / (step_ms + stage_ms):.2f}%) and the teacher's affinity pass the rest"
    )
    figures.figure(
        f"EHM stage: share of step + stage (ViT-tiny MAE, B={step_batch})", 100 * stage_ms / (step_ms + stage_ms), "%"
    )
    figures.figure(f"EHM tree build: share of step + stage (B={step_batch})", 100 * tree_ms / (step_ms + stage_ms), "%")
    figures.save(args.json)


if __name__ == "__main__":
    main()
