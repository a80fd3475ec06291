"""Benchmark timing waits for the device: a GPU figure measures the kernels, not their launch."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _timing  # noqa: E402


class FakeAccelerator:
    """A device whose work finishes only at synchronize(): stands in for CUDA on a CPU machine."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def is_available(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.events.append("sync")


def test_median_ms_synchronises_before_each_start_and_after_each_run(monkeypatch):
    fake = FakeAccelerator()
    monkeypatch.setattr(torch, "accelerator", fake)
    _timing.median_ms(lambda: fake.events.append("run"), repeats=3)
    assert fake.events == ["run"] + ["sync", "run", "sync"] * 3  # warm-up, then each timed run bracketed


def test_synchronize_is_a_no_op_on_a_cpu_only_machine(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a))
    if not torch.cuda.is_available():
        _timing.synchronize()
        assert calls == []
