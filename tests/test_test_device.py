import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import DEVICE_VARIABLE, device_from_env

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_defaults_to_the_cpu_and_reads_the_variable():
    assert device_from_env({}) == torch.device("cpu")
    assert device_from_env({DEVICE_VARIABLE: "cpu"}) == torch.device("cpu")
    assert device_from_env({DEVICE_VARIABLE: "meta"}) == torch.device("meta")


def test_an_unknown_or_absent_device_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"MASKLAB_TEST_DEVICE='bogus' is not a device this torch can use"):
        device_from_env({DEVICE_VARIABLE: "bogus"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"MASKLAB_TEST_DEVICE='cuda' is not a device this torch can use"):
            device_from_env({DEVICE_VARIABLE: "cuda"})


def test_the_fixture_is_the_variables_device(device):
    assert device == device_from_env(os.environ)


@pytest.mark.cpu_only
def test_cpu_only_tests_run_on_the_cpu_alone(device):
    assert device.type == "cpu"


def pytest_in(env_device: str, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {DEVICE_VARIABLE: env_device}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_pytest_selects_device_tests_runs_them_there_and_skips_the_cpu_only_ones():
    done = pytest_in("meta", "tests/test_test_device.py", "-m", "device", "-rs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 1 skipped, 3 deselected" in done.stdout
    assert "CPU only; MASKLAB_TEST_DEVICE=meta" in done.stdout
    bogus = pytest_in("bogus", "tests/test_test_device.py", "--co")
    assert bogus.returncode != 0 and "MASKLAB_TEST_DEVICE='bogus' is not a device" in bogus.stderr
