"""Loader throughput: masklab's FFCV loader against a torch DataLoader over PIL.

Same JPEG images, same random-resized crop (scale 0.2-1) and flip, 2 workers,
batch 256, at 64 and 128 px, all in one process. Contenders:

- ``masklab``: masklab draws the boxes, FFCV's decoder threads crop with
  them on uint8 pixels; boxes recorded in the Batch;
- ``ffcv-crop-decoder``: FFCV's own RandomResizedCropRGBImageDecoder + flip,
  which crops while decoding but cannot report the boxes;
- ``ffcv+device-crop``: FFCV decodes the whole image, the crop and flip run
  after it on the device (kornia), the alternative masklab measured and
  rejected for the CPU;
- ``dataloader+PIL``: torch DataLoader, PIL decode, torchvision
  RandomResizedCrop + RandomHorizontalFlip, the way most peers load.

Run: ``python benchmarks/loader.py [--quick]``. Prints images/s and ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import Figures, add_json_argument, synchronize
from PIL import Image

WORKERS = 2
BATCH = 256


def make_images(folder: Path, size: int, count: int) -> None:
    from masklab.pipeline import Shapes

    shapes = Shapes(size=64, length=count, seed=0)
    for i in range(count):
        image, label = shapes[i]
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        if size != 64:
            picture = picture.resize((size, size), Image.BICUBIC)
        picture.save(folder / str(label) / f"{i:05d}.jpg", quality=90)


class JpegFolder(torch.utils.data.Dataset):
    def __init__(self, root: Path, transform) -> None:
        self.files = sorted(root.rglob("*.jpg"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as image:
            return self.transform(image.convert("RGB")), int(self.files[i].parent.name)


def rate(make_iter, epochs: int) -> float:
    """Images per second over ``epochs`` epochs, after one warm-up epoch."""
    for _ in make_iter():
        pass
    synchronize()
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, *_ in make_iter():
            count += images.shape[0]
    synchronize()  # the last batch's device work is part of the time
    return count / (time.perf_counter() - start)


def bench(size: int, count: int, epochs: int, root: Path) -> dict[str, float]:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader as FFCVLoader
    from ffcv.loader import OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage
    from torchvision import transforms as T

    from masklab.pipeline import Loader, apply_crop, random_resized_crop_params, write_dataset

    folder = root / f"jpeg{size}"
    make_images(folder, size, count)
    beton = root / f"data{size}.beton"
    write_dataset(folder, beton, num_workers=WORKERS, progress=False)

    loader = Loader(beton, batch_size=BATCH, resolution=size, num_workers=WORKERS, seed=0)

    def masklab_iter():
        return ((b.images, b.labels) for b in loader)

    crop_decoder = FFCVLoader(
        str(beton),
        batch_size=BATCH,
        num_workers=WORKERS,
        order=OrderOption.RANDOM,
        drop_last=True,
        pipelines={
            "image": [
                RandomResizedCropRGBImageDecoder((size, size), scale=(0.2, 1.0)),
                RandomHorizontalFlip(),
                ToTensor(),
                ToTorchImage(),
            ],
            "label": [IntDecoder(), ToTensor()],
            "index": None,
        },
    )

    def ffcv_iter():
        # Same output as masklab's: float images in [0, 1].
        return ((images.float().div(255), labels) for images, labels in crop_decoder)

    whole = FFCVLoader(
        str(beton),
        batch_size=BATCH,
        num_workers=WORKERS,
        order=OrderOption.RANDOM,
        drop_last=True,
        pipelines={
            "image": [CenterCropRGBImageDecoder((size, size), ratio=1.0), ToTensor(), ToTorchImage()],
            "label": [IntDecoder(), ToTensor()],
            "index": None,
        },
    )
    generator = torch.Generator().manual_seed(0)

    def device_crop_iter():
        for images, labels in whole:
            params = random_resized_crop_params(images.shape[0], (size, size), generator=generator)
            yield apply_crop(images, params, (size, size)), labels

    transform = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    dataloader = torch.utils.data.DataLoader(
        JpegFolder(folder, transform),
        batch_size=BATCH,
        shuffle=True,
        num_workers=WORKERS,
        drop_last=True,
        persistent_workers=True,
    )
    results = {
        "masklab": rate(masklab_iter, epochs),
        "ffcv-crop-decoder": rate(ffcv_iter, epochs),
        "ffcv+device-crop": rate(device_crop_iter, epochs),
        "dataloader+PIL": rate(lambda: iter(dataloader), epochs),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    add_json_argument(parser)
    args = parser.parse_args()
    count, epochs = (2048, 1) if args.quick else (6144, 3)
    torch.set_num_threads(WORKERS)
    figures = Figures(
        "loader",
        f"{count} JPEGs, batch {BATCH}, {WORKERS} workers, {epochs} timed epoch(s), cpu, {os.cpu_count()} cores",
    )
    print(f"loader benchmark: {figures.setting}")
    print(f"{'px':>4} {'contender':>18} {'img/s':>9} {'vs dataloader+PIL':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            results = bench(size, count, epochs, Path(tmp))
            base = results["dataloader+PIL"]
            for name, value in results.items():
                print(f"{size:>4} {name:>18} {value:>9.0f} {value / base:>17.2f}x")
            for name, value in results.items():
                if name != "dataloader+PIL":
                    figures.compare(
                        f"{size} px: {name} vs DataLoader+PIL", value, "DataLoader+PIL", base, "img/s", True
                    )
    figures.save(args.json)
    np.set_printoptions()


if __name__ == "__main__":
    main()
