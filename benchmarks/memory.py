"""Gradient checkpointing: the activation memory a MAE step keeps for its backward pass, and its time.

A ViT (12 blocks, width 192: ViT-Ti's shape) at 64 px with 8 px patches, MAE
at 0.75, one forward + backward + AdamW step, with and without
``model.grad_checkpointing`` (the adapter's own block loop recomputes each
block in the backward pass). Memory is the bytes of the distinct tensors
autograd saves for the backward pass, counted with
``torch.autograd.graph.saved_tensors_hooks`` (on a CUDA device, also the peak
allocated memory); time is the median step.

Run: ``python benchmarks/memory.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import argparse

import torch
from _timing import Figures, add_json_argument, median_ms

from masklab.objectives import MAE, build_backbone
from masklab.pipeline import Batch
from masklab.transforms import RandomMask


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``step()``'s forward."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    parser.add_argument("--device", default="cpu")
    add_json_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch_size, repeats = (16, 3) if args.quick else (64, 5)
    images = torch.rand(batch_size, 3, 64, 64, device=device)
    batch = RandomMask(0.75, patch_size=8)(Batch(images=images, seed=0))
    rows = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = build_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8)
        backbone.model.set_grad_checkpointing(checkpointing)
        model = MAE(backbone, decoder_dim=128, decoder_depth=2).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def forward(model=model):
            return model(batch).loss

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            forward(model).backward()
            optimizer.step()

        memory = saved_bytes(forward)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        rows[checkpointing] = (memory, peak, median_ms(step, repeats))
    figures = Figures("memory", f"MAE, ViT-Ti shape, 64 px / 8 px patches, B={batch_size}, {device.type}")
    print(f"gradient checkpointing benchmark: {figures.setting}")
    print(f"{'checkpointing':>14} {'saved MB':>9} {'peak MB':>8} {'step ms':>8}")
    for checkpointing, (memory, peak, ms) in rows.items():
        peak_text = f"{peak / 2**20:.0f}" if peak is not None else "-"
        print(f"{'on' if checkpointing else 'off':>14} {memory / 2**20:>9.1f} {peak_text:>8} {ms:>8.0f}")
    (off_mem, off_peak, off_ms), (on_mem, on_peak, on_ms) = rows[False], rows[True]
    figures.compare(
        "activation memory kept for backward, checkpointing vs not", on_mem / 2**20, "not", off_mem / 2**20, "MB"
    )
    if off_peak is not None:
        figures.compare("peak GPU memory, checkpointing vs not", on_peak / 2**20, "not", off_peak / 2**20, "MB")
    figures.figure("step time with checkpointing, relative to without", on_ms / off_ms, "x")
    figures.save(args.json)


if __name__ == "__main__":
    main()
