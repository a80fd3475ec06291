import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from masklab.pipeline import Loader, read_info, to_hwc_uint8, write_dataset
from masklab.pipeline.writer import _quiet_progress

pytestmark = pytest.mark.ffcv


def sequential(path, **kwargs):
    return Loader(
        path, batch_size=16, resolution=32, order="sequential", scale=None, flip_p=0.0, drop_last=False, **kwargs
    )


def test_round_trip_keeps_labels_indices_and_pixels(shapes_beton, shapes_small):
    batches = list(sequential(shapes_beton))
    labels = torch.cat([b.labels for b in batches])
    index = torch.cat([b.index for b in batches])
    assert index.tolist() == list(range(len(shapes_small)))
    assert labels.tolist() == [shapes_small[i][1] for i in range(len(shapes_small))]
    source = torch.from_numpy(shapes_small[17][0].copy()).permute(2, 0, 1).float() / 255
    decoded = torch.cat([b.images for b in batches])[17]
    assert (decoded - source).abs().mean() < 0.05  # JPEG at quality 90
    other = torch.from_numpy(shapes_small[18][0].copy()).permute(2, 0, 1).float() / 255
    assert (decoded - other).abs().mean() > 0.1


def test_info_describes_the_file(shapes_beton):
    info = read_info(shapes_beton)
    assert info.count == 203
    assert set(info.fields) == {"image", "label", "index"}
    assert info.min_size == info.max_size == (32, 32)
    assert info.num_classes == 8 and info.classes[0] == "circle"
    assert "images:     203" in str(info)


def make_folder(root, corrupt=True):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    if corrupt:
        (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        good = root / "cat" / "0.png"
        (root / "cat" / "truncated.png").write_bytes(good.read_bytes()[:60])
    return root


def test_folder_source_skips_and_reports_corrupt_images(tmp_path):
    src = make_folder(tmp_path / "src")
    report = write_dataset(src, tmp_path / "out.beton", num_workers=1, progress=False)
    assert report.count == 6
    assert report.classes == ["cat", "dog"]
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in report.skipped) == ["broken.jpg", "truncated.png"]
    sidecar = json.loads((tmp_path / "out.beton.json").read_text())
    assert len(sidecar["skipped"]) == 2
    labels = torch.cat(
        [b.labels for b in Loader(tmp_path / "out.beton", batch_size=3, resolution=16, order="sequential")]
    )
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_strict_raises_on_the_corrupt_image(tmp_path):
    src = make_folder(tmp_path / "src")
    with pytest.raises(ValueError, match=r"cannot read image .*(broken.jpg|truncated.png)"):
        write_dataset(src, tmp_path / "out.beton", strict=True, num_workers=1, progress=False)
    assert not (tmp_path / "out.beton").exists()


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out.beton"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"out.beton exists; pass overwrite=True"):
        write_dataset((np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2)), out, progress=False)
    assert out.read_bytes() == b"precious"
    write_dataset((np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2)), out, overwrite=True, num_workers=1, progress=False)
    assert read_info(out).count == 2


def test_missing_and_empty_sources_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"source path .*nowhere does not exist"):
        write_dataset(tmp_path / "nowhere", tmp_path / "out.beton")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds no images"):
        write_dataset(tmp_path / "empty", tmp_path / "out.beton", progress=False)
    with pytest.raises(ValueError, match=r"no class subfolders"):
        write_dataset(tmp_path / "empty" / "cls", tmp_path / "out.beton", labels="folders", progress=False)
    with pytest.raises(ValueError, match=r"holds no images"):  # auto: a folder without subfolders is unlabelled
        write_dataset(tmp_path / "empty" / "cls", tmp_path / "out.beton", progress=False)


def test_tensor_source_in_chw_float(tmp_path):
    images = torch.rand(5, 3, 12, 12)
    report = write_dataset((images, torch.tensor([0, 1, 2, 1, 0])), tmp_path / "t.beton", num_workers=1, progress=False)
    assert report.count == 5 and report.classes == ["0", "1", "2"]
    assert read_info(tmp_path / "t.beton").min_size == (12, 12)


class Exploding:
    def __len__(self):
        return 300

    def __getitem__(self, i):
        if i in (250, 7):
            raise RuntimeError("disk on fire")
        return np.full((8, 8, 3), i % 256, np.uint8), i % 3


def test_a_failing_sample_is_skipped_and_indices_stay_dense(tmp_path):
    out = tmp_path / "out.beton"
    report = write_dataset(Exploding(), out, num_workers=2, progress=False)
    assert report.count == 298
    assert report.skipped == [("sample 7", "RuntimeError: disk on fire"), ("sample 250", "RuntimeError: disk on fire")]
    labels = torch.cat([b.labels for b in sequential(out)])
    expected = [i % 3 for i in range(300) if i not in (7, 250)]
    assert labels.tolist() == expected


def test_strict_raises_for_a_failing_sample(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read image sample 7: RuntimeError: disk on fire"):
        write_dataset(Exploding(), tmp_path / "out.beton", strict=True, num_workers=1, progress=False)


def test_an_interrupted_write_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    from ffcv.writer import DatasetWriter

    def crash(self, allocations):
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetWriter, "finalize", crash)
    out = tmp_path / "out.beton"
    with pytest.raises(KeyboardInterrupt):
        write_dataset((np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4)), out, num_workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


SLOW_WRITE = """
import os, sys, time
import numpy as np
from masklab.pipeline import write_dataset

class Slow:
    def __len__(self):
        return 4000

    def __getitem__(self, i):
        open(os.path.join(sys.argv[2], f"worker.{os.getpid()}"), "a").close()
        time.sleep(0.05)
        return np.zeros((8, 8, 3), np.uint8), 0

write_dataset(Slow(), sys.argv[1], num_workers=2, progress=False)
"""


def alive(pid):
    """Running, not merely a zombie waiting for a reaper (PID 1 in a container may not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the tie to the parent is Linux's prctl")
def test_writer_workers_die_with_a_killed_parent(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(tmp_path / "out.beton"), str(markers)])
    try:
        deadline = time.monotonic() + 120
        while len(list(markers.iterdir())) < 2:
            assert writer.poll() is None and time.monotonic() < deadline, "the writer never started its two workers"
            time.sleep(0.1)
        workers = {int(m.name.split(".")[1]) for m in markers.iterdir()}
        descendants = set(children(writer.pid))  # the two workers and multiprocessing's resource tracker
        segments = {
            line.split()[-1]
            for line in Path(f"/proc/{writer.pid}/maps").read_text().splitlines()
            if "/dev/shm/" in line
        }
        assert workers <= descendants and segments
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in descendants) or any(os.path.exists(s) for s in segments):
        assert time.monotonic() < deadline, (
            f"still running: {[p for p in descendants if alive(p)]}; "
            f"left in /dev/shm: {[s for s in segments if os.path.exists(s)]}"
        )
        time.sleep(0.1)
    assert not (tmp_path / "out.beton").exists()


REWRITE = r"Write it again from its source: `masklab write-dataset SRC .*{name} --overwrite`"


def damaged(source, path, keep=None, replace=None):
    data = bytearray(source.read_bytes())
    if keep is not None:
        data = data[:keep]
    for start, stop, value in replace or ():
        data[start:stop] = bytes([value]) * (stop - start)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (lambda size: 10, r"it holds 10 bytes, fewer than FFCV's 24-byte header"),
        (lambda size: 5000, r"it stops at byte 5000, before its allocation table at byte \d+ \(truncated\)"),
        (lambda size: size - 30, r"its allocation table, from byte \d+ to the end at \d+, is cut short"),
        (lambda size: size - 24, r"the image data of 1 of its 203 samples are not in its allocation table"),
    ],
)
def test_a_truncated_file_is_named_with_how_to_write_it_again(shapes_beton, tmp_path, cut, reason):
    bad = damaged(shapes_beton, tmp_path / "cut.beton", keep=cut(shapes_beton.stat().st_size))
    message = rf"{bad} is not a complete \.beton file: {reason}\. " + REWRITE.format(name="cut.beton")
    with pytest.raises(ValueError, match=message):
        read_info(bad)
    with pytest.raises(ValueError, match=message):
        Loader(bad, batch_size=8, num_workers=1)


def test_random_bytes_are_not_a_beton(tmp_path):
    bad = tmp_path / "noise.beton"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    message = (
        r"noise\.beton is not a complete \.beton file: its header is not FFCV's \(format version \d+, expected 2\)"
    )
    with pytest.raises(ValueError, match=message + r"\. " + REWRITE.format(name="noise.beton")):
        Loader(bad, batch_size=8, num_workers=1)
    with pytest.raises(ValueError, match=message):
        read_info(bad)


def test_corrupt_jpeg_data_is_counted_and_warned_each_epoch(shapes_beton, tmp_path):
    from ffcv.reader import Reader

    reader = Reader(str(shapes_beton))
    starts = reader.metadata["f0"]["data_ptr"]
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist(), strict=True))
    broken = [(int(starts[i]), int(starts[i]) + sizes[int(starts[i])], 0) for i in (50, 3)]
    bad = damaged(shapes_beton, tmp_path / "jpeg.beton", replace=broken)

    loader = sequential(bad, num_workers=1)
    for epoch in range(2):
        with pytest.warns(RuntimeWarning) as caught:
            images = torch.cat([b.images for b in loader])
        assert [str(w.message) for w in caught] == [
            f"2 of the 203 images of epoch {epoch} in {bad} failed to decode (corrupt JPEG data, at indices 3, 50): "
            f"they come out black. Write the file again from its source: "
            f"`masklab write-dataset SRC {bad} --overwrite`"
        ]
        assert images[3].abs().sum() == images[50].abs().sum() == 0 and images[4].mean() > 0.1

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(sequential(shapes_beton, num_workers=1))) == 13


def test_a_beton_without_masklab_fields_is_refused_by_name(tmp_path):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = tmp_path / "plain.beton"
    writer = DatasetWriter(str(path), {"image": RGBImageField(), "label": IntField()}, num_workers=1)
    with _quiet_progress(False):
        writer.from_indexed_dataset([(np.zeros((8, 8, 3), np.uint8), 0)] * 4)
    assert read_info(path).count == 4
    with pytest.raises(
        ValueError,
        match=r"plain\.beton is not a masklab dataset: it needs the fields image \(RGBImageField\), "
        r"label \(IntField\), index \(IntField\), and has image \(RGBImageField\), label \(IntField\); "
        r"write it with `masklab write-dataset`",
    ):
        Loader(path, batch_size=2, num_workers=1)


class Planted:
    """Unpickling this creates ``path``: the proof that a reader ran code from a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_the_sidecar_is_only_ever_parsed_as_json(shapes_beton, tmp_path):
    import pickle

    beton = tmp_path / "s.beton"
    beton.write_bytes(shapes_beton.read_bytes())
    sidecar = tmp_path / "s.beton.json"
    planted = tmp_path / "planted"

    sidecar.write_bytes(pickle.dumps(Planted(planted)))
    with pytest.raises(ValueError, match=r"s\.beton\.json is not JSON .*; delete it, or write .*s\.beton again"):
        read_info(beton)
    assert not planted.exists()

    sidecar.write_text(json.dumps({"classes": {"py/object": "os.system", "args": ["touch planted"]}}))
    with pytest.raises(ValueError, match=r"s\.beton\.json does not hold a list of class names under 'classes'"):
        read_info(beton)
    sidecar.write_text(json.dumps(["__reduce__", "os.system"]))
    with pytest.raises(ValueError, match=r"does not hold a list of class names"):
        read_info(beton)

    odd = ["!!python/object/apply:os.system", "__import__('os')", "py/reduce"]
    sidecar.write_text(json.dumps({"classes": odd, "extra": {"py/object": "os.system"}}))
    assert read_info(beton).classes == odd
    assert not planted.exists()


def test_a_16_bit_png_is_scaled_to_8_bits(tmp_path):
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 65535, 32)[None, :] * np.linspace(0.3, 1.0, 32)[:, None]
    source = np.clip(ramp + rng.normal(0, 500, (32, 32)), 0, 65535).astype(np.uint16)
    (tmp_path / "src" / "grey").mkdir(parents=True)
    Image.fromarray(source).save(tmp_path / "src" / "grey" / "deep.png")
    with Image.open(tmp_path / "src" / "grey" / "deep.png") as image:
        assert image.mode == "I;16"

    report = write_dataset(tmp_path / "src", tmp_path / "deep.beton", num_workers=1, progress=False)
    assert report.count == 1 and report.skipped == []
    batch = next(iter(Loader(tmp_path / "deep.beton", batch_size=1, resolution=32, scale=None, flip_p=0.0)))
    stored = batch.images[0] * 255
    assert abs(stored.mean().item() - source.mean() / 257) < 1.0
    assert (stored - torch.from_numpy(source / 257.0).float()).abs().mean() < 3.0  # JPEG at quality 90


def test_high_bit_depth_and_float_pil_images_are_scaled():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    expected = [0, 1, 128, 255]
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32))):
        assert image.mode in ("I;16", "I")
        assert to_hwc_uint8(image)[0, :, 0].tolist() == expected
    assert to_hwc_uint8(values)[0, :, 1].tolist() == expected
    assert to_hwc_uint8(Image.fromarray(values.astype(np.float32) / 65535))[0, :, 2].tolist() == expected
    with pytest.raises(ValueError, match=r"a PIL image of mode I with values in \[-1, 70000\] has no 8-bit scaling"):
        to_hwc_uint8(Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)))
    with pytest.raises(ValueError, match=r"int64 pixel values span \[0, 300\], outside 0\.\.255"):
        to_hwc_uint8(np.array([[0, 300]]))
    assert to_hwc_uint8(np.array([[0, 255]]))[0, :, 0].tolist() == [0, 255]
