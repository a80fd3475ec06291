import pytest

from masklab.recipes.demo import crop_picture_inputs, demo_markdown, run_demo


@pytest.mark.ffcv
@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_figures_and_pictures(tmp_path, capsys):
    # One epoch on 1024 images here; `make demo` runs 30 on 4000 (the figures in the README).
    extra = ["data.batch_size=128", "eval.linear_epochs=5"]
    result = run_demo(out_dir=tmp_path, device="cpu", epochs=1, extra=extra, length=1024)
    out = capsys.readouterr().out
    assert (tmp_path / "shapes-1024-32px.beton").exists() and (tmp_path / "shapes-1024-32px-test.beton").exists()
    for picture in ("masks.png", "crops.png", "mae/loss.png"):
        assert (tmp_path / picture).exists(), picture
    trained, random = result.runs["mae"]["0"], result.runs["random_vit"]["0"]
    assert trained["updates"] == 1024 // 128 and random["updates"] == 0
    assert result.settings["length"] == 1024
    for scores in (trained, random):
        assert 0 <= scores["knn"] <= 1 and 0 <= scores["linear"] <= 1
    # The printout names both encoders with both metrics, and the gain in one line.
    assert f"{trained['linear']:.4f}" in out and f"{random['knn']:.4f}" in out
    gain = 100 * (trained["linear"] - random["linear"])
    assert f"pretraining gain: {gain:+.1f} points of linear-probe accuracy" in out
    # demo.json holds what was printed, and its README table is written from it.
    assert "| 0 | " in demo_markdown(result)


@pytest.mark.ffcv
def test_crop_picture_draws_each_box_over_the_pixels_it_cut(shapes_beton):
    """The pixels under each drawn box, resized (and flipped if the crop was), are the crop shown below it."""
    import torch

    from masklab.pipeline import CropParams, apply_crop

    sources, boxes, flips, crops = crop_picture_inputs(shapes_beton, n=8, resolution=32)
    assert flips.any() and not flips.all()  # both kinds are drawn, so both are checked
    again = apply_crop(sources, CropParams(boxes, flips), (32, 32))
    # FFCV resizes with OpenCV's area filter, apply_crop bilinearly: close, not equal.
    error = (again - crops).abs().mean(dim=(1, 2, 3))
    assert error.max() < 0.02, error
    # Sources drawn mirrored (the old picture's fault) would put the box over other pixels.
    mirrored = torch.where(flips[:, None, None, None], sources.flip(-1), sources)
    wrong = (apply_crop(mirrored, CropParams(boxes, flips), (32, 32)) - crops).abs().mean(dim=(1, 2, 3))
    assert (wrong[flips] > 0.03).all(), wrong


def test_demo_refuses_fewer_than_four_images_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match="length=3: the demo needs at least 4 training images"):
        run_demo(out_dir=tmp_path / "demo", device="cpu", length=3)
    assert not (tmp_path / "demo").exists()
