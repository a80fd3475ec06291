"""Any data in: flat folders, path lists, Hugging Face datasets and WebDataset shards become .beton files."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from masklab.pipeline import Loader, read_info, write_dataset
from masklab.pipeline.sources import PathList, TarShards, expand_shards

pytestmark = pytest.mark.ffcv


def colour(i: int) -> np.ndarray:
    return np.full((12, 12, 3), 20 * i, dtype=np.uint8)


def save(path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(colour(i)).save(path)


def labels_and_means(beton) -> tuple[list[int], list[float]]:
    loader = Loader(beton, batch_size=64, resolution=12, order="sequential", scale=None, flip_p=0.0, drop_last=False)
    batches = list(loader)
    images = torch.cat([b.images for b in batches])
    return torch.cat([b.labels for b in batches]).tolist(), [round(float(m) * 255 / 20) for m in images.mean((1, 2, 3))]


def write(source, out, **kwargs):
    return write_dataset(source, out, num_workers=1, progress=False, **kwargs)


def test_a_flat_folder_is_read_recursively_without_labels(tmp_path):
    save(tmp_path / "src" / "a.png", 1)
    save(tmp_path / "src" / "deep" / "er" / "b.jpg", 2)
    save(tmp_path / "src" / "deep" / "c.png", 3)
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    report = write(tmp_path / "src", tmp_path / "flat.beton")
    assert report.count == 3 and report.classes == []
    info = read_info(tmp_path / "flat.beton")
    assert not info.labelled and info.unlabelled == 3 and "unlabelled: 3 images" in str(info)
    labels, means = labels_and_means(tmp_path / "flat.beton")
    assert labels == [-1, -1, -1] and means == [1, 3, 2]  # sorted paths: a.png, deep/c.png, deep/er/b.jpg


def test_class_folders_are_still_classes_and_can_be_read_as_unlabelled(tmp_path):
    for name, i in (("cat/1.png", 1), ("dog/2.png", 2)):
        save(tmp_path / "src" / name, i)
    assert write(tmp_path / "src", tmp_path / "a.beton").classes == ["cat", "dog"]
    assert labels_and_means(tmp_path / "a.beton")[0] == [0, 1]
    assert write(tmp_path / "src", tmp_path / "b.beton", labels="none").classes == []
    assert labels_and_means(tmp_path / "b.beton")[0] == [-1, -1]
    with pytest.raises(ValueError, match="labels must be one of"):
        write(tmp_path / "src", tmp_path / "c.beton", labels="maybe")


def test_a_path_list_with_and_without_labels(tmp_path):
    for i in range(3):
        save(tmp_path / "imgs" / f"{i}.png", i + 1)
    (tmp_path / "labelled.txt").write_text(
        "# path label\nimgs/2.png 1\n\nimgs/0.png\t0\n" + f"{tmp_path}/imgs/1.png 4\n"
    )
    report = write(tmp_path / "labelled.txt", tmp_path / "l.beton")
    assert report.classes == ["0", "1", "2", "3", "4"]
    assert labels_and_means(tmp_path / "l.beton") == ([1, 0, 4], [3, 1, 2])
    (tmp_path / "plain.txt").write_text("imgs/0.png\nimgs/1.png\n")
    assert write(tmp_path / "plain.txt", tmp_path / "p.beton").classes == []
    (tmp_path / "mixed.txt").write_text("imgs/0.png 1\nimgs/1.png\n")
    with pytest.raises(ValueError, match=r"mixed.txt:2: some lines have a label and some do not"):
        PathList(tmp_path / "mixed.txt")


def test_a_hugging_face_dataset_in_memory_and_saved_to_disk(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["red", "blue"])})
    ds = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(colour(i)) for i in (1, 2, 3)], "y": [1, 0, 1]}, features=features
    )
    report = write(ds, tmp_path / "hf.beton", image_column="img", label_column="y")
    assert report.classes == ["red", "blue"]
    assert labels_and_means(tmp_path / "hf.beton") == ([1, 0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match=r"no image column 'image'; its columns are \['img', 'y'\]"):
        write(ds, tmp_path / "x.beton")
    ds.save_to_disk(str(tmp_path / "saved"))
    from masklab.recipes.cli import main

    args = ["write-dataset", str(tmp_path / "saved"), str(tmp_path / "cli.beton"), "--workers", "1"]
    assert main([*args, "--image-column", "img", "--label-column", "none"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out and "unlabelled" in str(read_info(tmp_path / "cli.beton"))


def test_webdataset_shards_by_brace_range_with_a_corrupt_sample_skipped(tmp_path):
    wds = pytest.importorskip("webdataset")
    n = 0
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{shard:03d}.tar")) as sink:
            for _ in range(3):
                buffer = io.BytesIO()
                Image.fromarray(colour(n + 1)).save(buffer, format="PNG")
                data = buffer.getvalue() if n != 4 else b"not a png"
                sink.write({"__key__": f"s{n:04d}", "png": data, "cls": n % 2})
                n += 1
    pattern = str(tmp_path / "shard-{000..001}.tar")
    assert [p.name for p in expand_shards(pattern)] == ["shard-000.tar", "shard-001.tar"]
    report = write(pattern, tmp_path / "w.beton")
    assert report.count == 5 and [p.rsplit(":", 1)[-1] for p, _ in report.skipped] == ["s0004"]
    assert labels_and_means(tmp_path / "w.beton") == ([0, 1, 0, 1, 1], [1, 2, 3, 4, 6])
    assert json.loads((tmp_path / "w.beton.json").read_text())["count"] == 5
    assert len(TarShards(tmp_path / "shard-000.tar")) == 3
    with pytest.raises(FileNotFoundError, match="no WebDataset shard"):
        expand_shards(str(tmp_path / "shard-{000..002}.tar"))


def test_pretraining_on_unlabelled_data_needs_labelled_evaluation_data(tmp_path):
    from masklab.recipes.config import load_config
    from masklab.recipes.train import train

    for i in range(40):
        save(tmp_path / "flat" / f"{i:02d}.png", i % 12)
    write(tmp_path / "flat", tmp_path / "flat.beton")
    run = ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "objective.decoder_dim=32", "data.resolution=16"]
    run += [f"data.train={tmp_path / 'flat.beton'}", "data.batch_size=16", "run.epochs=1", "run.progress=false"]
    run += ["data.num_workers=1"]
    with pytest.raises(ValueError, match=r"eval.data=.*flat.beton has unlabelled images, and the kNN evaluation"):
        train(load_config("mae", [*run, f"run.out={tmp_path / 'a'}"]))
    assert not (tmp_path / "a" / "checkpoints").exists()
    result = train(load_config("mae", [*run, f"run.out={tmp_path / 'b'}", "eval.data=builtin:shapes"]))
    assert result.updates == 2 and 0 <= result.knn <= 1
