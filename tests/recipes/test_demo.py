import pytest

from masklab.recipes.demo import run_demo


@pytest.mark.ffcv
@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_pictures(tmp_path, capsys):
    # One epoch here; `make demo` runs 30 (the figures in the README).
    result = run_demo(out_dir=tmp_path, device="cpu", epochs=1, extra=["data.batch_size=256"])
    out = capsys.readouterr().out
    assert (tmp_path / "shapes.beton").exists() and (tmp_path / "shapes-test.beton").exists()
    for picture in ("masks.png", "crops.png", "mae/loss.png"):
        assert (tmp_path / picture).exists(), picture
    assert 0 <= result["knn_trained"] <= 1 and 0 <= result["knn_random"] <= 1
    assert "MAE-pretrained encoder:" in out and "random init:" in out
