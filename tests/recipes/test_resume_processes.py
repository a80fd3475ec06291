"""Resume on another number of processes: the same weights, the loader position mapped, or a clear error."""

import pytest
import torch

from masklab.recipes.checkpoint import load_checkpoint
from masklab.recipes.config import load_config
from masklab.recipes.run_folder import RunFolderError
from masklab.recipes.train import train

from .test_train import TINY, train_on_two_cpu_processes

# 64 images: an epoch is 4 global batches of 16 (16 on one process, or 8 on each of two).
RUN = [*TINY, "data.length=64", "run.epochs=2", "run.record_indices=true", "run.ckpt_every=100"]


def first_epoch_order() -> list[int]:
    """The global order of epoch 0 (the same on any number of processes)."""
    from masklab.pipeline import epoch_order

    return epoch_order(64, seed=0, epoch=0).tolist()


def weights(checkpoint):
    return load_checkpoint(checkpoint, training_state=False).model


@pytest.mark.slow
def test_two_processes_then_one_sees_the_rest_of_the_epoch_with_the_same_weights(tmp_path):
    out = tmp_path / "run"
    two = [*RUN, f"run.out={out}", "data.batch_size=8", "run.stop_at=2"]
    r0, r1 = train_on_two_cpu_processes(tmp_path, "mae", two, 29541)
    seen = set(r0["indices"].tolist()) | set(r1["indices"].tolist())
    assert len(seen) == 32  # 2 updates x global batch 16
    with pytest.raises(RunFolderError, match=r"changes the global batch to 8: set data.batch_size=16"):
        train(load_config("mae", [*RUN, f"run.out={out}", "data.batch_size=8", "run.resume=auto"]))
    one = [*RUN, f"run.out={out}", "data.batch_size=16", "run.resume=auto"]
    at_checkpoint = train(load_config("mae", [*one, "run.stop_at=2"]))  # loads, trains nothing
    for name, value in weights(out / "checkpoints" / "ckpt-00000002").items():
        torch.testing.assert_close(at_checkpoint.model.state_dict()[name], value, atol=0, rtol=0)
    rest = train(load_config("mae", [*one, "run.stop_at=4"]))
    resumed = rest.indices.tolist()
    assert len(resumed) == 32 and set(resumed) | seen == set(range(64))  # the epoch completed, nothing twice
    assert resumed == first_epoch_order()[32:64]  # the global order, continued


@pytest.mark.slow
def test_one_process_then_two_sees_the_rest_of_the_epoch(tmp_path):
    out = tmp_path / "run"
    first = train(load_config("mae", [*RUN, f"run.out={out}", "data.batch_size=16", "run.stop_at=1"]))
    assert first.indices.tolist() == first_epoch_order()[:16]
    two = [*RUN, f"run.out={out}", "data.batch_size=8", "run.resume=auto", "run.stop_at=4"]
    r0, r1 = train_on_two_cpu_processes(tmp_path, "mae", two, 29543)
    resumed = set(r0["indices"].tolist()) | set(r1["indices"].tolist())
    assert len(r0["indices"]) == len(r1["indices"]) == 24  # 3 updates x 8 on each process
    assert resumed == set(first_epoch_order()[16:64])
    for name, value in r0["weights"].items():
        torch.testing.assert_close(r1["weights"][name], value)
