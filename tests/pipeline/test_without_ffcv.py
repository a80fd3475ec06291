import subprocess
import sys
import textwrap

import pytest

from masklab.pipeline import Loader, read_info, write_dataset


@pytest.fixture
def no_ffcv(monkeypatch):
    # A None entry makes `import ffcv` raise ImportError, as on a machine without it.
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ffcv", None)


@pytest.mark.parametrize(
    "call",
    [
        lambda p: Loader(p / "x.beton"),
        lambda p: write_dataset([], p / "x.beton"),
        lambda p: read_info(__file__),
    ],
    ids=["Loader", "write_dataset", "read_info"],
)
def test_ffcv_paths_say_exactly_what_to_install(no_ffcv, tmp_path, call):
    with pytest.raises(ImportError) as info:
        call(tmp_path)
    message = str(info.value)
    assert "pip install 'masklab[ffcv]'" in message
    assert "apt-get install pkg-config libturbojpeg0-dev libopencv-dev g++" in message


def test_everything_else_imports_and_runs_without_ffcv():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["ffcv"] = None
        import torch
        import masklab, masklab.pipeline, masklab.transforms, masklab.objectives, masklab.recipes
        from masklab.pipeline import DatasetLoader, Shapes, ffcv_available
        from masklab.transforms import Normalize
        assert not ffcv_available()
        loader = DatasetLoader(Shapes(size=16, length=8), stages=[Normalize()], batch_size=4, resolution=8)
        print(sum(len(b) for b in loader))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8"
