"""Throwing: one MAE training step at mask 0.75 against mask 0.45 + throw 0.40, and AMT's costs.

ViT-tiny (patch 16, 224 px), a 2-block decoder of width 128, same batch,
side by side in one process. With throwing, the encoder sees 29 of 196
patches instead of 49, and the decoder 117 tokens instead of 196 (THROWN
cells are dropped everywhere). Prints step times and their ratio next to
the ratio of token counts. Then MAE + AMT at the paper's ratios (0.45 /
0.40, the AttentionMask stage drawing from a filled saliency cache, crop
alignment included) against plain MAE, and the cost of AMT's refresh pass
(a no-grad saliency pass over the data) per epoch of training.

Run: ``python benchmarks/throwing.py [--quick]``.
"""

from __future__ import annotations

import argparse

import torch
from _timing import Figures, add_json_argument, median_ms

from masklab.objectives import MAE, ViTBackbone
from masklab.pipeline import Batch, RandomResizedCrop
from masklab.transforms import AttentionMask, RandomMask, amt_refresh_epochs


def step_ms(model: MAE, batch: Batch, optimizer: torch.optim.Optimizer, repeats: int) -> float:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        optimizer.step()

    return median_ms(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the model and the stages run (default cpu)")
    add_json_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch_size = args.batch_size or (16 if args.quick else 64)
    repeats = 3 if args.quick else 5
    torch.manual_seed(0)
    model = MAE(ViTBackbone.from_name("vit_tiny_patch16_224", img_size=224), decoder_dim=128, decoder_depth=2).to(
        device
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch_size, 3, 224, 224, device=device)
    plain = RandomMask(0.75, 16)(Batch(images=images, seed=0))
    thrown = RandomMask(0.45, 16, throw_ratio=0.40)(Batch(images=images, seed=0))
    p = model.backbone.num_prefix
    rows = []
    for name, batch in (("mask 0.75", plain), ("mask 0.45 + throw 0.40", thrown)):
        m = batch.mask
        rows.append(
            (name, step_ms(model, batch, optimizer, repeats), p + m.num_visible, p + m.num_visible + m.num_masked)
        )
    figures = Figures("throwing", f"ViT-tiny MAE, B={batch_size}, 224 px, {device}, {torch.get_num_threads()} threads")
    print(f"throwing benchmark: {figures.setting}")
    print(f"{'masking':>24} {'step ms':>9} {'encoder tokens':>15} {'decoder tokens':>15}")
    for name, ms, enc, dec in rows:
        print(f"{name:>24} {ms:>9.0f} {enc:>15} {dec:>15}")
    (_, base, enc0, dec0), (_, fast, enc1, dec1) = rows
    figures.compare("MAE step: mask 0.45 + throw 0.40 vs mask 0.75", fast, "mask 0.75", base, "ms")
    figures.figure("encoder tokens with throwing / without", enc1 / enc0, "ratio")
    print(
        f"step time ratio {fast / base:.2f} (speed-up {base / fast:.2f}x); token ratios: encoder {enc1 / enc0:.2f}, decoder {dec1 / dec0:.2f}"
    )

    # MAE + AMT: the stage draws from a filled cache for every step (crop alignment included).
    amt = AttentionMask(num_samples=batch_size, ratio=0.45, throw_ratio=0.40, patch_size=16, grid=(14, 14))
    amt.bind(model.guidance("saliency"))
    index = torch.arange(batch_size, device=device)
    cropped = RandomResizedCrop(224)(Batch(images=images, index=index, seed=0))
    whole = Batch(images=images, index=index)
    amt.refresh([whole], (14, 14))
    counter = iter(range(10**9))

    def amt_step() -> None:
        batch = amt(cropped.replace(seed=next(counter)))
        optimizer.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        optimizer.step()

    amt_ms = median_ms(amt_step, repeats)
    stage_ms = median_ms(lambda: amt(cropped.replace(seed=next(counter))), repeats)
    refresh_ms = median_ms(lambda: amt.refresh([whole], (14, 14)), repeats)
    figures.compare("MAE + AMT step (0.45 / 0.40) vs MAE 0.75", amt_ms, "MAE 0.75", base, "ms")
    figures.figure("AttentionMask stage: share of an AMT step", 100 * stage_ms / amt_ms, "%")
    print(f"\nMAE 0.75: {base:.0f} ms/step; MAE + AMT 0.45/0.40: {amt_ms:.0f} ms/step ({base / amt_ms:.2f}x faster)")
    print(f"AttentionMask stage alone: {stage_ms:.1f} ms per batch ({100 * stage_ms / amt_ms:.2f}% of an AMT step)")
    epochs_per_refresh = refresh_ms / base
    refreshes = len(amt_refresh_epochs(400))
    print(
        f"refresh pass: {refresh_ms:.0f} ms per {batch_size} images, {epochs_per_refresh:.2f} epochs of plain MAE training "
        f"per refresh; AMT's schedule refreshes {refreshes} times a run: +{100 * refreshes * epochs_per_refresh / 400:.1f}% "
        f"of the training time at 400 epochs, +{100 * refreshes * epochs_per_refresh / 40:.0f}% at 40"
    )
    figures.figure(
        "AMT refresh passes: added training time at 400 epochs", 100 * refreshes * epochs_per_refresh / 400, "%"
    )
    figures.save(args.json)


if __name__ == "__main__":
    main()
