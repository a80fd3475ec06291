"""The run folder: no run's outputs lost, one writer at a time, resumes that match their checkpoint."""

import errno
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from masklab.recipes.checkpoint import list_checkpoints
from masklab.recipes.cli import main
from masklab.recipes.config import load_config
from masklab.recipes.run_folder import LOCK_FILE, RunLock, config_changes
from masklab.recipes.train import train

from .test_train import TINY, losses_of


def contents(folder):
    """Every file under ``folder`` with its bytes: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def names(folder):
    return [p.name for p in list_checkpoints(folder / "checkpoints")]


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture
def previous_run(tmp_path):
    out = tmp_path / "run"
    train(load_config("mae", [*TINY, f"run.out={out}", "run.max_steps=4", "run.ckpt_every=1", "run.keep=2"]))
    assert names(out) == ["ckpt-00000003", "ckpt-00000004"]
    return out


def test_a_fresh_run_into_a_previous_runs_folder_is_refused_and_nothing_is_lost(previous_run, capsys):
    before = contents(previous_run)
    code, err = run_cli(["train", "mae", *TINY, f"run.out={previous_run}", "run.max_steps=2"], capsys)
    assert code == 2
    assert f"run.out {previous_run} holds a previous run's outputs (metrics.csv, loss.png, " in err
    assert "checkpoints/ckpt-00000004)" in err
    assert "Continue it with --resume auto (run.resume=auto)" in err
    assert "start afresh with --overwrite (run.overwrite=true)" in err
    assert contents(previous_run) == before  # config.yaml included: never rewritten before the checks


def test_overwrite_deletes_the_previous_runs_outputs_so_rotation_keeps_the_new_ones(previous_run):
    overrides = [*TINY, f"run.out={previous_run}", "run.max_steps=2", "run.ckpt_every=1", "run.keep=2"]
    train(load_config("mae", [*overrides, "run.overwrite=true"]))
    # Without the deletion the old ckpt-3 and ckpt-4 would outrank the new run's own checkpoints.
    assert names(previous_run) == ["ckpt-00000001", "ckpt-00000002"]
    assert sorted(losses_of(previous_run)) == [1, 2]


def test_overwrite_and_resume_together_are_refused(previous_run, capsys):
    before = contents(previous_run)
    argv = ["train", "mae", *TINY, f"run.out={previous_run}", "--resume", "auto", "--overwrite"]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert "run.resume='auto' and run.overwrite=true: overwrite deletes the checkpoints a resume reads" in err
    assert contents(previous_run) == before


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    lock = {"pid": pid, "host": host or socket.gethostname(), "since": "2025-01-01 00:00:00"}
    (folder / LOCK_FILE).write_text(json.dumps(lock))
    return folder / LOCK_FILE


@pytest.mark.parametrize("host", [None, "another-machine"])
def test_a_second_writer_is_refused_naming_the_holder(tmp_path, sleeper, host, capsys):
    out = tmp_path / "run"
    lock = write_lock(out, sleeper, host)
    before = contents(out)
    code, err = run_cli(["train", "mae", *TINY, f"run.out={out}", "run.max_steps=1"], capsys)
    assert code == 2
    holder = f"PID {sleeper} on host {host or socket.gethostname()}, since 2025-01-01 00:00:00"
    assert f"run.out {out} is in use by another run ({holder}; lock file {lock})" in err
    assert f"or delete {lock} if that run no longer exists" in err
    assert contents(out) == before  # the lock is the holder's still; no config.yaml, no metrics


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_at_the_end(tmp_path, caplog):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    out = tmp_path / "run"
    lock = write_lock(out, dead)
    with caplog.at_level(logging.WARNING):
        result = train(load_config("mae", [*TINY, f"run.out={out}", "run.max_steps=1"]))
    assert result.updates == 1
    assert f"taking over the stale lock {lock} (its holder, PID {dead} on {socket.gethostname()}, no longer runs)" in (
        caplog.text
    )
    assert not lock.exists()


def test_the_lock_names_its_holder_and_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "run"
    with RunLock(out) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no temporary file beside it
    assert not lock.path.exists()
    with pytest.raises(ValueError, match="set objective.teacher_decay"):  # fails after the lock is taken
        train(load_config("ehm", [*TINY, f"run.out={out}", "objective.teacher_decay=null"]))
    assert (out / "config.yaml").exists() and not (out / LOCK_FILE).exists()


def test_a_read_only_run_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root ignores permissions: refuse the write as the file system would
        real = os.link

        def read_only(src, dst, *args, **kwargs):
            if str(dst).startswith(str(out)):
                raise PermissionError(errno.EACCES, "Permission denied", str(dst))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "link", read_only)
    try:
        code, err = run_cli(["train", "mae", *TINY, f"run.out={out}", "run.max_steps=1"], capsys)
        assert code == 2
        assert f"run.out {out} is not writable (Permission denied): choose another run.out or make it writable" in err
        assert contents(out) == {"notes.txt": b"mine"}
    finally:
        out.chmod(0o755)


@pytest.fixture
def stopped_run(tmp_path):
    """A run of 12 updates stopped after 5, checkpoints at 2, 4 and 5."""
    out = tmp_path / "cut"
    train(load_config("mae", [*TINY, f"run.out={out}", "run.ckpt_every=2", "run.stop_at=5", "run.keep=5"]))
    assert names(out) == ["ckpt-00000002", "ckpt-00000004", "ckpt-00000005"]
    return out


def test_a_resume_that_changes_the_schedule_model_or_data_is_refused_listing_each_key(stopped_run, capsys):
    before = contents(stopped_run)
    changed = ["data.batch_size=8", "model.kwargs.depth=2", "optim.lr=0.01"]
    code, err = run_cli(["train", "mae", *TINY, *changed, f"run.out={stopped_run}", "--resume", "auto"], capsys)
    assert code == 2
    checkpoint = stopped_run / "checkpoints" / "ckpt-00000005"
    assert f"resuming {checkpoint} with a config that changes the schedule, the model or the data:\n" in err
    assert "  data.batch_size: 16 -> 8\n  model.kwargs.depth: 1 -> 2\n  optim.lr: 0.0015 -> 0.01\n" in err
    assert "A resume may change: run.log_every, run.progress, run.stop_at" in err
    assert contents(stopped_run) == before  # config.yaml still the checkpoint's


def test_a_resume_may_change_logging_checkpointing_and_evaluation(stopped_run):
    harmless = ["run.log_every=1", "run.progress=false", "run.ckpt_every=3", "run.keep=1", "eval.knn_k=5"]
    resumed = train(load_config("mae", [*TINY, *harmless, f"run.out={stopped_run}", "run.resume=auto"]))
    assert resumed.updates == 12 and sorted(losses_of(stopped_run)) == list(range(1, 13))
    assert "log_every: 1" in (stopped_run / "config.yaml").read_text()  # written once the check passed


def test_config_changes_counts_keys_an_older_checkpoint_lacks_as_their_defaults():
    old = {"run": {"epochs": 3}, "data": {"batch_size": 16}}
    new = {"run": {"epochs": 3, "overwrite": False, "max_steps": None}, "data": {"batch_size": 16}}
    assert config_changes(old, new) == []
    assert config_changes(old, {**new, "run": {"epochs": 4}}) == ["run.epochs: 3 -> 4"]


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.pt", "optimizer.bin", "random_states_0.pkl"])
def test_resume_auto_skips_a_truncated_newest_checkpoint_saying_why(stopped_run, damaged, caplog):
    newest = stopped_run / "checkpoints" / "ckpt-00000005" / damaged
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.INFO):
        resumed = train(load_config("mae", [*TINY, f"run.out={stopped_run}", "run.resume=auto"]))
    skipped = f"--resume auto: skipping {newest.parent}, which does not load: {newest} is not a complete checkpoint"
    assert skipped in caplog.text
    assert f"resumed from {stopped_run / 'checkpoints' / 'ckpt-00000004'} at update 4" in caplog.text
    assert resumed.updates == 12 and sorted(losses_of(stopped_run)) == list(range(1, 13))


def test_resume_auto_without_a_checkpoint_says_it_starts_afresh_once(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        result = train(load_config("mae", [*TINY, f"run.out={out}", "run.max_steps=2", "run.resume=auto"]))
    message = f"--resume auto: no checkpoint in {out / 'checkpoints'}, so this run starts afresh"
    assert caplog.text.count(message) == 1
    assert result.updates == 2 and names(out) == ["ckpt-00000002"]
