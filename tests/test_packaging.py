import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_only_init_py_at_the_root():
    # Any other .py at the root would be packaged inside masklab.
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py"]


def test_import_from_any_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import masklab.transforms, masklab.pipeline; print(masklab.transforms.__name__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "masklab.transforms"


@pytest.mark.slow
def test_wheel_maps_the_folders_into_one_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("masklab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "__init__.py",
        "pipeline/loader.py",
        "transforms/normalize.py",
        "objectives/__init__.py",
        "recipes/cli.py",
    ):
        assert f"masklab/{module}" in names
    checkout_only = ("masklab/tests", "masklab/benchmarks", "masklab/tools", "tests/", "benchmarks/", "tools/")
    assert not any(n.startswith(checkout_only) for n in names)
