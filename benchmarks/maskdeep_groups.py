"""MaskDeep: one training step at G = 1, 2, 4, 8 mask groups, side by side in one process.

ResNet-18 (``features_only``, stages of stride 8, 16 and 32) at 64 px, two
views, projector/predictor 1024-128-1024 (the shapes recipe's sizes), EMA
teacher, multi-target. Each row is one forward + backward + SGD step with
the same batch; the encoder runs once per view whatever G is, so only the
light heads (pooling, projectors, predictors) scale with G. The last
column is the encoder's share: one forward + backward of the two views'
encoder passes alone.

Run: ``python benchmarks/maskdeep_groups.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse

import torch
from _timing import Figures, add_json_argument, median_ms

from masklab.objectives import CNNBackbone, MaskDeep
from masklab.pipeline import Batch
from masklab.transforms import Views


def step_ms(model: MaskDeep, batch: Batch, repeats: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        optimizer.step()
        for teacher, student in model.teachers():
            teacher.update(student, progress=0.0)

    return median_ms(step, repeats)


def encoder_ms(model: MaskDeep, views: list[torch.Tensor], repeats: int) -> float:
    def encode() -> None:
        maps = [model.levels(model.backbone, view, model.strides) for view in views]
        sum(f.mean() for view in maps for f in view).backward()

    return median_ms(encode, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the model and the stages run (default cpu)")
    parser.add_argument("--size", type=int, default=64, help="image size in px (default 64)")
    add_json_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size = args.batch_size or (16 if args.quick else 64)
    repeats = 3 if args.quick else 7
    images = torch.rand(batch_size, 3, args.size, args.size, device=device)
    views = Views(2, "byol")(Batch(images=images, seed=0))
    rows = []
    for groups in (1, 2, 4, 8):
        torch.manual_seed(0)
        model = MaskDeep(
            CNNBackbone.from_name("resnet18"), (8, 16, 32), groups, hidden=1024, dim=128, pred_hidden=1024
        ).to(device)
        rows.append((groups, step_ms(model, model.mask_stage(0.5)(views), repeats)))
    encoder = encoder_ms(model, views.views, repeats)
    base = rows[0][1]
    figures = Figures(
        "maskdeep_groups",
        f"ResNet-18, {args.size} px, B={batch_size}, two views, {device}, {torch.get_num_threads()} threads",
    )
    print(f"MaskDeep groups benchmark: {figures.setting}")
    print(f"{'groups':>7} {'step ms':>9} {'vs G=1':>8} {'encoder share':>14}")
    for groups, ms in rows:
        print(f"{groups:>7} {ms:>9.0f} {ms / base:>7.2f}x {100 * encoder / ms:>13.0f}%")
    print(f"encoder alone (two views, forward + backward): {encoder:.0f} ms")
    for groups, ms in rows[1:]:
        figures.compare(f"MaskDeep step, G={groups} vs G=1 (cost of groups)", ms, "G=1", base, "ms")
    figures.figure("encoder share of a G=4 step", 100 * encoder / dict(rows)[4], "%")
    figures.save(args.json)


if __name__ == "__main__":
    main()
