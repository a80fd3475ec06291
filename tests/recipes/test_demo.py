import pytest

from masklab.recipes.demo import run_demo


@pytest.mark.ffcv
@pytest.mark.slow
def test_demo_writes_data_pictures_and_reports(tmp_path, capsys):
    result = run_demo(out_dir=tmp_path, batch_size=256, epochs=2)
    out = capsys.readouterr().out
    assert (tmp_path / "shapes.beton").exists()
    assert (tmp_path / "crops.png").exists() and (tmp_path / "masks.png").exists()
    assert result["images"] == 15 * 256  # 4000 images, drop_last
    assert result["images_per_s"] > 0
    assert "images:     4000" in out
