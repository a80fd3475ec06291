"""Mask stages, batched on the device, against per-sample CPU generators as peers run them.

B=256 images of 224 px, patch 16: a 14x14 grid. Contenders, side by side:

- ``RandomMask`` (0.75) and ``SimMIMMask`` (0.6, 32 px cells) against a
  SimMIM-style generator: per sample, a NumPy permutation of the cells, the
  first ``ceil(n * ratio)`` masked, upsampled to the patch grid;
- ``BlockMask`` (0.4, BEiT) against a BEiT-style generator: per sample, a
  Python loop placing random rectangles (10 attempts each) until the count;
- ``MixMask`` (8x8 layout, 0.5; the draw of masks and partners) against the
  BEiT-style generator on the 8x8 layout, per sample, upsampled to pixels;
- ``FeatureMask`` (strides 8/16/32, 0.5, 4 groups) against the SimMIM-style
  generator per sample and group, upsampled to every stride;
- ``ColorNoiseMask`` (green, 0.75: fresh noise filtered by FFT on the
  device) against a ColorMAE-style generator: a precomputed NumPy bank of
  green-noise textures (64x64 cells, one per sample of the batch), cropped
  and flipped once for the whole stack and ranked per sample, as ColorMAE's
  code does (its cheapest case: a bank at least as deep as the batch);
- ``MultiBlockMask`` (4 targets, I-JEPA's scales) against an I-JEPA
  collator-style generator: a Python loop per sample placing the blocks
  with torch ops (retrying the context until it keeps ``min_keep`` cells),
  then trimming every index list to the batch's shortest.
- ``AttMask`` (hint mode, 0.75, 10% hints) on a stand-in saliency map (the model's pass is not timed)
  against a per-sample loop of the same ranking: AttMask computes its mask inside the model, so it has no
  per-sample generator of its own to compare with;
- ``HardPatchMask`` (HPM: 0.75, at the end of its schedule, half the masked
  cells the hardest) on a stand-in difficulty map (the model's pass that
  predicts it is not timed: it is a no-grad forward of the encoder on every
  patch plus the loss predictor) against an HPM-style generator: one argsort
  of the map, then per sample the hardest cells set apart and the rest
  shuffled with NumPy on the host, as the authors' released code does.

Then each stage's cost as a share of one ViT-tiny forward + backward on the
same batch (B=32 with ``--quick``). Run: ``python benchmarks/masks.py [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import random

import numpy as np
import torch
from _timing import Figures, add_json_argument, median_ms

from masklab.pipeline import Batch
from masklab.transforms import (
    AttMask,
    BlockMask,
    ColorNoiseMask,
    FeatureMask,
    HardPatchMask,
    MixMask,
    MultiBlockMask,
    RandomMask,
    SimMIMMask,
    color_noise,
    mix_images,
)

BATCH, SIZE, PATCH = 256, 224, 16


def simmim_style(batch: int, grid: int, ratio: float, scale: int = 1) -> np.ndarray:
    """Per sample: permute the cells, mask the first ones, repeat up to the patch grid."""
    out = []
    for _ in range(batch):
        cells = grid * grid
        mask = np.zeros(cells, dtype=int)
        mask[np.random.permutation(cells)[: int(math.ceil(cells * ratio))]] = 1
        mask = mask.reshape(grid, grid).repeat(scale, axis=0).repeat(scale, axis=1)
        out.append(mask)
    return np.stack(out)


def beit_style_one(height: int, width: int, count: int, min_cells: int = 4, aspect=(0.3, 1 / 0.3)) -> np.ndarray:
    """One sample: random rectangles, 10 attempts each, until ``count`` cells (may stop short)."""
    mask = np.zeros((height, width), dtype=int)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    masked = 0
    while masked < count:
        budget = count - masked
        added = 0
        for _ in range(10):
            area = random.uniform(min_cells, max(min_cells, budget))
            ratio = math.exp(random.uniform(*log_aspect))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if 0 < w < width and 0 < h < height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                new = h * w - mask[top : top + h, left : left + w].sum()
                if 0 < new <= budget:
                    mask[top : top + h, left : left + w] = 1
                    added = new
                    break
        if added == 0:
            break
        masked += added
    return mask


def beit_style(batch: int, grid: int, ratio: float, min_cells: int = 4, pixel_scale: int = 1) -> np.ndarray:
    count = int(round(grid * grid * ratio))
    masks = [beit_style_one(grid, grid, count, min_cells) for _ in range(batch)]
    if pixel_scale > 1:
        masks = [m.repeat(pixel_scale, 0).repeat(pixel_scale, 1) for m in masks]
    return np.stack(masks)


def feature_style(batch: int, groups: int, strides=(8, 16, 32), ratio: float = 0.5) -> list[np.ndarray]:
    coarse = SIZE // strides[-1]
    base = simmim_style(batch * groups, coarse, ratio).reshape(batch, groups, coarse, coarse)
    return [base.repeat(strides[-1] // s, 2).repeat(strides[-1] // s, 3) for s in strides]


def green_noise_bank(depth: int, side: int = 64) -> np.ndarray:
    """ColorMAE's precomputed textures (built once, not timed): ``depth`` green-noise fields of ``side`` cells."""
    return color_noise(depth, (side, side), "green", generator=torch.Generator().manual_seed(0)).numpy()


def colormae_style(bank: np.ndarray, batch: int, grid: int, ratio: float) -> np.ndarray:
    """Windows of the texture bank, one random crop and flips per pass over the stack; keep each highest."""
    depth, side, _ = bank.shape
    windows = []
    for start in range(0, batch, depth):
        top, left = np.random.randint(0, side - grid + 1, size=2)
        window = bank[:, top : top + grid, left : left + grid]
        if np.random.rand() < 0.5:
            window = window[:, :, ::-1]
        if np.random.rand() < 0.5:
            window = window[:, ::-1, :]
        window = window / window.max(axis=(1, 2), keepdims=True)
        windows.append(window[: batch - start])
    flat = np.concatenate(windows).reshape(batch, grid * grid)
    keep = int(grid * grid * (1 - ratio))
    mask = np.ones_like(flat, dtype=np.uint8)
    np.put_along_axis(mask, np.argsort(-flat, axis=1)[:, :keep], 0, axis=1)
    return mask.reshape(batch, grid, grid)


def ijepa_style(
    batch: int,
    grid: int,
    targets: int = 4,
    target_scale=(0.15, 0.2),
    aspect=(0.75, 1.5),
    context_scale=(0.85, 1.0),
    min_keep: int = 10,
    seed: int = 0,
):
    """An I-JEPA-collator-style draw: sizes once per batch, then a Python loop over samples and blocks."""
    generator = torch.Generator().manual_seed(seed)

    def size(scale, ratio_range):
        u = torch.rand(1, generator=generator).item()
        cells = int(grid * grid * (scale[0] + u * (scale[1] - scale[0])))
        ratio = ratio_range[0] + u * (ratio_range[1] - ratio_range[0])
        return min(round(math.sqrt(cells * ratio)), grid - 1), min(round(math.sqrt(cells / ratio)), grid - 1)

    def place(h, w, allowed=()):
        for attempt in range(10**6):
            top, left = torch.randint(0, grid - h, (1,)), torch.randint(0, grid - w, (1,))
            block = torch.zeros((grid, grid), dtype=torch.int32)
            block[top : top + h, left : left + w] = 1
            for region in allowed[: max(len(allowed) - attempt // 20, 0)]:
                block *= region
            cells = torch.nonzero(block.flatten()).squeeze(1)
            if len(cells) > min_keep:
                outside = torch.ones((grid, grid), dtype=torch.int32)
                outside[top : top + h, left : left + w] = 0
                return cells, outside
        raise RuntimeError("no block found")

    target_size, context_size = size(target_scale, aspect), size(context_scale, (1.0, 1.0))
    all_targets, contexts = [], []
    for _ in range(batch):
        placed = [place(*target_size) for _ in range(targets)]
        all_targets.append([cells for cells, _ in placed])
        contexts.append(place(*context_size, [outside for _, outside in placed])[0])
    shortest_target = min(len(c) for sample in all_targets for c in sample)
    shortest_context = min(len(c) for c in contexts)
    target_ids = torch.stack([torch.stack([c[:shortest_target] for c in sample]) for sample in all_targets])
    return torch.stack([c[:shortest_context] for c in contexts]), target_ids


def hpm_style(difficulty: torch.Tensor, ratio: float = 0.75, hard_fraction: float = 0.5) -> torch.Tensor:
    """One argsort of the ``(B, N)`` map; per sample, the hardest cells last and the others shuffled on the host."""
    batch, cells = difficulty.shape
    keep = int(cells * (1 - ratio))
    hard = int((cells - keep) * hard_fraction)
    by_difficulty = torch.argsort(difficulty, dim=1)
    order = torch.empty_like(by_difficulty)
    for i in range(batch):
        hardest = by_difficulty[i, cells - hard :]
        others = np.delete(np.arange(cells), hardest.cpu().numpy())
        np.random.shuffle(others)
        order[i, : cells - hard] = torch.from_numpy(others).to(difficulty.device)
        order[i, cells - hard :] = hardest
    masked = (torch.arange(cells, device=difficulty.device) >= keep).expand(batch, cells)
    return masked.gather(1, order.argsort(dim=1))


def per_sample_attmask(saliency: torch.Tensor, ratio: float = 0.75, hint: float = 0.1) -> torch.Tensor:
    """AttMask-Hint per sample (a loop of the same ranking; AttMask computes it inside its model, no peer generator)."""
    batch, cells = saliency.shape
    count = int(round(cells * ratio))
    shown = int(round(count * hint))
    out = torch.zeros_like(saliency, dtype=torch.bool)
    for i in range(batch):
        top = torch.argsort(saliency[i], descending=True)[:count]
        out[i, top[torch.randperm(count, device=saliency.device)[shown:]]] = True
    return out


def vit_step_ms(batch: torch.Tensor, name: str = "vit_tiny_patch16_224", bf16: bool = False) -> float:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=batch.shape[-1]).to(batch.device)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch).float().pow(2).mean()
        loss.backward()

    return median_ms(step, 3 if bf16 else 1)


def stage_rows(images: torch.Tensor):
    """(name, timed masklab call, reference name, timed reference call) for a batch of ``images``."""
    batch, grid = images.shape[0], SIZE // PATCH

    def stage_fn(stage):
        counter = iter(range(10**9))
        return lambda: stage(Batch(images=images, seed=next(counter)))

    mixer = MixMask(8, 0.5)
    generator = torch.Generator(device=images.device).manual_seed(0)

    def mix_draw():  # the masks and partners; mixing the pixels is timed apart
        return mixer.draw(images, generator)

    bank = green_noise_bank(batch)
    collations = iter(range(10**9))
    difficulty = torch.rand(batch, grid, grid, generator=generator, device=images.device)  # a stand-in map
    hpm = HardPatchMask(0.75, PATCH)
    hpm.bind(lambda x, cells: difficulty)
    hpm.set_progress(1.0)
    saliency = torch.rand(batch, grid, grid, generator=generator, device=images.device)  # a stand-in map
    attmask = AttMask(0.75, PATCH, "hint", 0.1)
    attmask.bind(lambda x, cells: saliency)

    return [
        ("RandomMask 0.75", stage_fn(RandomMask(0.75, PATCH)), "SimMIM-style", lambda: simmim_style(batch, grid, 0.75)),
        (
            "SimMIMMask 0.6",
            stage_fn(SimMIMMask(0.6, 32, PATCH)),
            "SimMIM-style",
            lambda: simmim_style(batch, SIZE // 32, 0.6, 2),
        ),
        ("BlockMask 0.4", stage_fn(BlockMask(0.4, PATCH)), "BEiT-style", lambda: beit_style(batch, grid, 0.4)),
        ("MixMask 8x8", mix_draw, "BEiT-style 8x8", lambda: beit_style(batch, 8, 0.5, 1, SIZE // 8)),
        (
            "FeatureMask G=4",
            stage_fn(FeatureMask((8, 16, 32), 0.5, 4)),
            "SimMIM-style x G",
            lambda: feature_style(batch, 4),
        ),
        (
            "ColorNoise green",
            stage_fn(ColorNoiseMask(0.75, PATCH)),
            "ColorMAE bank",
            lambda: colormae_style(bank, batch, grid, 0.75),
        ),
        (
            "MultiBlockMask",
            stage_fn(MultiBlockMask(PATCH)),
            "I-JEPA collator",
            lambda: ijepa_style(batch, grid, seed=next(collations)),
        ),
        ("HardPatchMask 0.75", stage_fn(hpm), "HPM-style", lambda: hpm_style(difficulty.flatten(1))),
        ("AttMask 0.75 hint", stage_fn(attmask), "per-sample loop", lambda: per_sample_attmask(saliency.flatten(1))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; the step shares at B=32")
    parser.add_argument("--device", default="cpu", help="where the stages draw (default cpu; cuda on a GPU)")
    parser.add_argument("--batch-size", type=int, default=BATCH, help=f"images per batch (default {BATCH})")
    add_json_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 5 if args.quick else 20
    torch.set_num_threads(2)
    images = torch.rand(args.batch_size, 3, SIZE, SIZE, device=device)
    grid = SIZE // PATCH
    threads = torch.get_num_threads()
    where = f"{device}, {threads} threads" if device.type == "cpu" else str(device)
    figures = Figures("masks", f"B={args.batch_size}, {SIZE} px, patch {PATCH} ({grid}x{grid} grid), {where}")
    print(f"mask benchmark: {figures.setting}")
    print(f"{'stage':>16} {'ms/batch':>9} {'reference':>17} {'ms/batch':>9} {'speed-up':>9}")
    for name, ours, ref_name, ref in stage_rows(images):
        ours_ms, ref_ms = median_ms(ours, repeats), median_ms(ref, max(3, repeats // 4))
        ratio = figures.compare(f"{name} vs {ref_name} per sample", ours_ms, f"{ref_name} per sample", ref_ms, "ms")
        print(f"{name:>16} {ours_ms:>9.2f} {ref_name:>17} {ref_ms:>9.2f} {ratio:>8.1f}x")

    # Each stage's share of a ViT step on the same batch: ViT-tiny in fp32 on a CPU (B=32 in --quick: the
    # step is slow there), the MAE paper's ViT-B/16 in bf16 on an accelerator.
    step_images = images[:32] if args.quick and device.type == "cpu" else images
    step_batch = step_images.shape[0]
    on_cpu = device.type == "cpu"
    vit = "ViT-tiny" if on_cpu else "ViT-B/16 bf16"
    step = vit_step_ms(step_images, "vit_tiny_patch16_224" if on_cpu else "vit_base_patch16_224", bf16=not on_cpu)
    print(f"\n{vit} forward+backward, B={step_batch}, {SIZE} px: {step:.0f} ms")
    figures.figure(f"{vit} forward + backward, B={step_batch}", step, "ms")
    for name, ours, _, _ in stage_rows(step_images):
        share = 100 * median_ms(ours, repeats) / step
        figures.figure(f"{name}: share of a {vit} step, B={step_batch}", share, "%")
        print(f"{name:>16} {share:>6.2f}% of a step")
    mixer, generator = MixMask(8, 0.5), torch.Generator(device=device).manual_seed(0)
    mix_ms = median_ms(lambda: mix_images(step_images, mixer.draw(step_images, generator)), 3)
    figures.figure(f"MixMask + pixel mixing: share of a {vit} step, B={step_batch}", 100 * mix_ms / step, "%")
    print(
        f"{'MixMask + mixing':>16} {100 * mix_ms / step:>6.2f}% of a step ({mix_ms:.0f} ms: the pixel mixing dominates)"
    )
    figures.save(args.json)


if __name__ == "__main__":
    main()
