import gc
import itertools
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from masklab.pipeline import Batch, DatasetLoader, InMemoryImages, Lambda, Loader, Stage, epoch_order

from ..conftest import as_numpy, assert_same_batches


class Jitter(Stage):
    """A random stage, so determinism covers stage randomness too."""

    def make_params(self, batch, generator):
        return torch.rand(len(batch), 1, 1, 1, generator=generator, device=batch.device)

    def apply(self, batch, params):
        return batch.replace(images=batch.images * params)


@pytest.fixture(scope="module")
def shapes_in_memory(shapes_small):
    return InMemoryImages.read(shapes_small)


@pytest.fixture(params=["ffcv", "dataset", "memory"])
def make_loader(request, shapes_small):
    """The loaders over the same 203 images: FFCV's, a dataset's, and the dataset held in memory."""
    if request.param == "ffcv":
        path = request.getfixturevalue("shapes_beton")
        return lambda **kw: Loader(path, num_workers=1, **kw)
    if request.param == "memory":
        data = request.getfixturevalue("shapes_in_memory")
        return lambda **kw: DatasetLoader(data, **kw)
    return lambda **kw: DatasetLoader(shapes_small, **kw)


def run(loader, limit=None):
    return [as_numpy(batch) for batch in itertools.islice(loader, limit)]


def test_batches_are_batches_with_crops_on_the_device(make_loader):
    batch = next(iter(make_loader(batch_size=16, resolution=24, stages=[Jitter()])))
    assert isinstance(batch, Batch)
    assert batch.images.shape == (16, 3, 24, 24) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == torch.long and batch.index.dtype == torch.long
    assert batch.crops.shape == (16, 4) and batch.flips.shape == (16,)
    assert batch.source_sizes.tolist() == [[32, 32]] * 16
    assert batch.device.type == "cpu"


def test_one_seed_gives_identical_batches(make_loader):
    a = run(make_loader(batch_size=32, seed=4, stages=[Jitter()]))
    b = run(make_loader(batch_size=32, seed=4, stages=[Jitter()]))
    assert_same_batches(a, b)
    c = run(make_loader(batch_size=32, seed=5, stages=[Jitter()]))
    assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_epochs_differ_and_drop_last_gives_full_batches(make_loader):
    loader = make_loader(batch_size=32, seed=0)
    first, second = run(loader), run(loader)
    assert len(first) == len(second) == 203 // 32 == len(loader)
    assert all(b["images"].shape[0] == 32 for b in first)
    assert not np.array_equal(first[0]["index"], second[0]["index"])
    assert loader.state_dict() == {"seed": 0, "epoch": 2, "step": 0}


def test_keep_last_partial_batch(make_loader):
    batches = run(make_loader(batch_size=32, drop_last=False, order="sequential"))
    assert [len(b["index"]) for b in batches] == [32] * 6 + [11]
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(203))


def test_resume_from_state_dict_mid_epoch_yields_the_same_remaining_batches(make_loader):
    reference_loader = make_loader(batch_size=16, seed=3, stages=[Jitter()])
    run(reference_loader)  # epoch 0
    reference = run(reference_loader)  # epoch 1, uninterrupted

    interrupted = make_loader(batch_size=16, seed=3, stages=[Jitter()])
    run(interrupted)
    run(interrupted, limit=5)  # killed after 5 batches of epoch 1
    state = interrupted.state_dict()
    assert state == {"seed": 3, "epoch": 1, "step": 5}

    resumed = make_loader(batch_size=16, seed=99, stages=[Jitter()])
    resumed.load_state_dict(state)
    assert_same_batches(run(resumed), reference[5:])
    assert resumed.state_dict() == {"seed": 3, "epoch": 2, "step": 0}


def test_load_state_dict_rejects_bad_state(make_loader):
    loader = make_loader(batch_size=16)
    with pytest.raises(KeyError, match="step"):
        loader.load_state_dict({"seed": 0, "epoch": 0})
    with pytest.raises(ValueError, match=r"step 99 is outside \[0, 12\]"):
        loader.load_state_dict({"seed": 0, "epoch": 0, "step": 99})


def test_crop_boxes_are_the_ones_applied(make_loader):
    """Re-cropping the uncropped source with the recorded boxes gives the batch back."""
    from masklab.pipeline import CropParams, apply_crop

    full = make_loader(batch_size=8, order="sequential", scale=None, flip_p=0.0)
    cropped = make_loader(batch_size=8, order="sequential", seed=1)
    source = next(iter(full))
    batch = next(iter(cropped))
    assert torch.equal(batch.index, source.index)
    again = apply_crop(source.images, CropParams(batch.crops, batch.flips), (32, 32))
    # FFCV resizes with OpenCV's area filter, apply_crop bilinearly: close, not equal.
    assert (again - batch.images).abs().mean() < 0.01
    wrong = apply_crop(source.images, CropParams(batch.crops, ~batch.flips), (32, 32))
    assert (wrong - batch.images).abs().mean() > 0.03


def test_distributed_needs_a_process_group(make_loader):
    with pytest.raises(RuntimeError, match="initialised process group"):
        make_loader(batch_size=8, distributed=True)


def test_a_stage_chain_runs_after_any_source(tensor_dataset):
    seen = []
    stage = Lambda(lambda b: seen.append(b.images.shape) or b.replace(images=b.images * 0))
    loader = DatasetLoader(tensor_dataset, stages=[stage], batch_size=10, resolution=8)
    out = list(loader)
    assert len(out) == 4 and seen == [torch.Size([10, 3, 8, 8])] * 4
    assert all(b.images.abs().sum() == 0 for b in out)


def test_dataset_loader_of_mixed_sizes_needs_decode_size():
    data = [(torch.zeros(3, 8, 8, dtype=torch.uint8), 0), (torch.zeros(3, 10, 12, dtype=torch.uint8), 1)]
    with pytest.raises(ValueError, match=r"decode_size"):
        list(DatasetLoader(data, batch_size=2, resolution=4))
    batch = next(iter(DatasetLoader(data, batch_size=2, resolution=4, decode_size=8)))
    assert batch.source_sizes.tolist() == [[8, 8]] * 2


@pytest.mark.slow
@pytest.mark.ffcv
def test_two_gloo_ranks_read_disjoint_shards_covering_the_dataset(shapes_beton, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            import torch, torch.distributed as dist
            from masklab.pipeline import Loader
            dist.init_process_group("gloo")
            loader = Loader({str(shapes_beton)!r}, batch_size=17, resolution=16, distributed=True, seed=2, num_workers=1)
            seen = torch.cat([b.index for b in loader])
            gathered = [torch.zeros_like(seen) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, seen)
            if dist.get_rank() == 0:
                torch.save(gathered, {str(tmp_path / "seen.pt")!r})
            dist.destroy_process_group()
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (t.tolist() for t in torch.load(tmp_path / "seen.pt"))
    # 203 samples on 2 ranks: 102 each (one padding repeat); 102 // 17 = 6 full batches each.
    assert len(rank0) == len(rank1) == 102
    # Disjoint but for the one padding repeat: rank 1's last sample is the epoch's first.
    assert set(rank0) & set(rank1) == {rank0[0]} == {rank1[-1]}
    assert not set(rank0) & set(rank1[:-1])
    assert rank0 == epoch_order(203, seed=2, epoch=0, rank=0, world_size=2).tolist()
    assert rank1 == epoch_order(203, seed=2, epoch=0, rank=1, world_size=2).tolist()
    assert len(set(rank0) | set(rank1)) == 203


def ffcv_threads():
    from ffcv.loader.epoch_iterator import EpochIterator

    return [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]


@pytest.mark.ffcv
def test_ffcv_thread_stops_when_the_iterator_is_dropped_closed_or_replaced(shapes_beton):
    loader = Loader(shapes_beton, batch_size=16, resolution=16, num_workers=1)
    assert next(iter(loader)).images.shape == (16, 3, 16, 16)
    gc.collect()
    assert ffcv_threads() == []

    first = iter(loader)
    next(first)
    assert len(ffcv_threads()) == 1
    second = iter(loader)
    assert len(next(second).index) == 16
    assert len(ffcv_threads()) == 1  # the new epoch stopped the first one's thread
    with pytest.raises(RuntimeError, match="reading was stopped .* iterate the loader again"):
        next(first)
    second.close()
    assert ffcv_threads() == []
    assert loader.state_dict() == {"seed": 0, "epoch": 0, "step": 3}


@pytest.mark.ffcv
def test_loader_as_context_manager_stops_its_thread_and_can_read_again(shapes_beton):
    with Loader(shapes_beton, batch_size=16, resolution=16, num_workers=2, order="sequential") as loader:
        held = iter(loader)
        assert next(held).index.tolist() == list(range(16))
        assert len(ffcv_threads()) == 1
    assert ffcv_threads() == []
    assert next(iter(loader)).index.tolist() == list(range(16, 32))
    gc.collect()
    assert ffcv_threads() == []


ONE_BATCH = """
import sys
from masklab.pipeline import Loader
from masklab.transforms import Normalize
stages = [Normalize(mean=(0.5,) * 3, std=(0.25,) * 3)] if sys.argv[3] == "stages" else []
loader = Loader(sys.argv[1], batch_size=16, resolution=32, num_workers=int(sys.argv[2]), stages=stages)
batch = next(iter(loader))
print(tuple(batch.images.shape))
"""


@pytest.mark.slow
@pytest.mark.ffcv
def test_a_script_that_takes_one_batch_and_exits_exits_cleanly(shapes_beton):
    """Before the loader stopped FFCV's thread, about half these processes aborted (exit code 134): the four
    runs would all pass with that defect about once in 16 times. Four, not more: each process pays numba's
    compile of FFCV's pipeline (about 25 s on a slow 2-core machine)."""
    cases = [(workers, stages) for workers in (1, 2) for stages in ("none", "stages")]

    def one_run(case):
        workers, stages = case
        command = [sys.executable, "-c", ONE_BATCH, str(shapes_beton), str(workers), stages]
        return case, subprocess.run(command, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one_run, cases))
    assert len(results) == 4
    for (workers, stages), result in results:
        assert (result.returncode, result.stdout.strip()) == (0, "(16, 3, 32, 32)"), (
            f"num_workers={workers}, {stages}: exit code {result.returncode}\n{result.stderr[-2000:]}"
        )
        assert "terminate called" not in result.stderr


FAIL_AT_FIRST_BATCH = """
import sys
from masklab.pipeline import Lambda, Loader

def fail(batch):
    raise ValueError("this stage refuses its first batch")

loader = Loader(sys.argv[1], batch_size=16, resolution=32, num_workers=2, stages=[Lambda(fail)])
for batch in loader:
    pass
"""


@pytest.mark.slow
@pytest.mark.ffcv
def test_an_error_at_the_first_batch_ends_the_process_with_its_exception_not_an_abort(shapes_beton):
    """The error leaves FFCV's reading thread running; it used to turn exit code 1 into 134 at exit (in about
    half the runs). One run, so this catches that defect about every other time: each process pays numba's
    compile of FFCV's pipeline (about 25 s on a slow 2-core machine)."""
    command = [sys.executable, "-c", FAIL_AT_FIRST_BATCH, str(shapes_beton)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "ValueError: this stage refuses its first batch" in result.stderr
    assert "terminate called" not in result.stderr


@pytest.mark.ffcv
def test_an_error_in_ffcvs_thread_is_raised_not_waited_on(shapes_beton, monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    def fail(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(EpochIterator, "run_pipeline", fail)
    loader = Loader(shapes_beton, batch_size=16, resolution=16, num_workers=1)
    outcome = []

    def read():
        try:
            next(iter(loader))
        except RuntimeError as error:
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the loader waited forever on FFCV's dead thread"
    assert [str(e) for e in outcome] == ["FFCV's reading thread failed: OSError: disk on fire"]
    assert ffcv_threads() == []


def test_a_batch_of_one_keeps_its_batch_dimension(make_loader):
    batches = run(make_loader(batch_size=101, drop_last=False, order="sequential"))
    assert [b["index"].tolist() for b in batches[2:]] == [[202]]
    assert batches[2]["labels"].shape == (1,) and batches[2]["images"].shape == (1, 3, 32, 32)


def test_images_in_memory_give_the_batches_the_dataset_gives(shapes_small, shapes_in_memory, device):
    # Same order, crops, flips, labels and stage draws, over two epochs and a partial last batch, on the device.
    kw = {"batch_size": 32, "resolution": 24, "seed": 3, "stages": [Jitter()], "drop_last": False, "device": device}
    read, held = DatasetLoader(shapes_small, num_workers=1, **kw), DatasetLoader(shapes_in_memory, **kw)
    assert_same_batches(run(read) + run(read), run(held) + run(held))
    assert shapes_in_memory.images.device.type == "cpu"  # the copy on the device is the loader's own
    first = next(iter(DatasetLoader(shapes_in_memory, **kw)))
    assert first.images.device.type == device.type and first.labels.device.type == device.type
    # At another decode_size the images are read (resized) per batch as any dataset's are.
    resized = kw | {"decode_size": 16}
    assert_same_batches(run(DatasetLoader(shapes_small, **resized)), run(DatasetLoader(shapes_in_memory, **resized)))


def test_in_memory_images_are_read_once_with_labels_and_bad_tensors_are_named():
    data = InMemoryImages.read([torch.zeros(3, 6, 8, dtype=torch.uint8)] * 5, size=4)  # images alone
    assert data.images.shape == (5, 3, 4, 4) and data.labels.tolist() == [-1] * 5  # centre squares; no labels
    with pytest.raises(ValueError, match=r"square uint8 \(N, 3, S, S\), got torch.float32 of shape \(2, 3, 4, 4\)"):
        InMemoryImages(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"got torch.uint8 of shape \(2, 3, 4, 5\)"):
        InMemoryImages(torch.zeros(2, 3, 4, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"labels must be \(2,\), one per image, got shape \(3,\)"):
        InMemoryImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.arange(3))
