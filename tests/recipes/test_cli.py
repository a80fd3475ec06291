import subprocess
import sys

import pytest

from masklab.recipes.cli import build_parser, main

pytestmark = pytest.mark.ffcv


def test_write_builtin_then_info(tmp_path, capsys):
    out = tmp_path / "s.beton"
    assert (
        main(["write-dataset", "--builtin", "shapes", "--length", "24", "--size", "32", "--workers", "1", str(out)])
        == 0
    )
    assert "wrote 24 images" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "images:     24" in text
    assert "resolution: 32x32" in text
    assert "classes:    8 (circle, square, triangle, cross, star, ring, semicircle, arrow)" in text


def test_existing_output_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "s.beton"
    out.write_bytes(b"keep me")
    code = main(["write-dataset", "--builtin", "digits", str(out)])
    assert code == 2
    assert "s.beton exists; pass overwrite=True (--overwrite on the command line)" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    assert main(["write-dataset", str(tmp_path / "nope"), str(tmp_path / "o.beton")]) == 2
    assert "source path" in capsys.readouterr().err


def test_write_digits_folder_round_trip(tmp_path, capsys):
    out = tmp_path / "d.beton"
    assert main(["write-dataset", "--builtin", "digits", "--split", "test", "--workers", "1", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    assert "classes:    10" in capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["write-dataset"], ["info"], ["demo"]])
def test_help_everywhere(command):
    result = subprocess.run(
        [sys.executable, "-m", "masklab.recipes.cli", *command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "usage: masklab" in result.stdout


def test_parser_knows_its_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"write-dataset", "info", "demo"} <= set(sub.choices)


def test_list_prints_the_declared_matrix_and_every_recipe(capsys):
    from masklab.objectives import compatibility_table
    from masklab.recipes.config import CONFIG_DIR

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert compatibility_table() in out
    for path in CONFIG_DIR.glob("*.yaml"):
        assert f"| `{path.stem}` |" in out
    assert "| `ehm` | pretrain | mae | ehm | vit_tiny_patch16_224 |" in out
    assert "| `maskdeep` | pretrain | maskdeep | feature | resnet18 |" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "knn", "random", "--data", "builtin:shapes", "--test", "builtin:shapes:test", "a.b=1", "c.d=2"],
        ["eval", "knn", "random", "a.b=1", "--data", "builtin:shapes", "c.d=2", "--test", "builtin:shapes:test"],
        ["eval", "knn", "random", "a.b=1", "c.d=2", "--data", "builtin:shapes", "--test", "builtin:shapes:test"],
    ],
)
def test_options_and_overrides_come_in_any_order(argv):
    from masklab.recipes.cli import _parse

    args = _parse(build_parser(), argv)
    assert (args.data, args.test, args.overrides) == ("builtin:shapes", "builtin:shapes:test", ["a.b=1", "c.d=2"])


def test_eval_applies_overrides_given_after_its_options(capsys):
    tiny = ["data.length=32", "data.resolution=16", "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"]
    assert main(["eval", "knn", "random", *tiny, "--data", "builtin:shapes"]) == 0
    before = capsys.readouterr().out
    assert main(["eval", "knn", "random", "--data", "builtin:shapes", *tiny]) == 0
    assert capsys.readouterr().out == before
    assert main(["eval", "knn", "random", "--data", "builtin:shapes", *tiny, "model.backbone=vit_tinyy"]) == 2
    assert "error: model.backbone 'vit_tinyy' is not a timm model" in capsys.readouterr().err


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "knn", "random", "--date", "x.beton", "run.seed=1"])
    assert "unrecognized arguments: --date x.beton run.seed=1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.grad_accum=0", "optim.grad_accum must be at least 1, got 0"),  # at load
        (
            "model.backbone=resnet_18",
            "model.backbone 'resnet_18' is not a timm model; close names: resnet18",
        ),  # at build
    ],
)
def test_train_prints_the_message_and_exits_non_zero_without_a_traceback(override, message, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "masklab.recipes.cli",
            "train",
            "mae",
            f"run.out={tmp_path}",
            "--resume",
            "auto",
            override,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"masklab train: error: {message}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_truncated_dataset_is_a_clear_error(shapes_beton, tmp_path, capsys):
    from ffcv.reader import Reader

    table = Reader(str(shapes_beton)).header["alloc_table_ptr"]
    bad = tmp_path / "cut.beton"
    bad.write_bytes(shapes_beton.read_bytes()[:5000])
    assert main(["info", str(bad)]) == 2
    assert capsys.readouterr().err == (
        f"masklab info: error: {bad} is not a complete .beton file: it stops at byte 5000, before its allocation "
        f"table at byte {table} (truncated). Write it again from its source: "
        f"`masklab write-dataset SRC {bad} --overwrite`\n"
    )


def test_help_builds_its_parser_without_torch_or_the_library():
    code = "import sys; from masklab.recipes.cli import build_parser; build_parser(); print(*sorted(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = result.stdout.split()
    assert "torch" not in loaded
    assert [name for name in loaded if name.startswith("masklab.")] == ["masklab.recipes", "masklab.recipes.cli"]


@pytest.mark.parametrize(
    "argv,tool",
    [(["bench"], "bench"), (["study"], "study"), (["demo", "--readme", "README.md"], "demo --readme")],
)
def test_checkout_tools_say_so_when_masklab_is_installed_without_them(argv, tool, monkeypatch, capsys, tmp_path):
    for name in ("masklab.tools", "masklab.tools.bench", "masklab.tools.study", "masklab.tools.readme"):
        monkeypatch.setitem(sys.modules, name, None)  # as in a wheel, which leaves masklab/tools/ out
    assert main([*argv, "--out", str(tmp_path)]) == 2  # the demo stops before it trains
    assert f"masklab {argv[0]}: error: {tool} is a tool of masklab's source checkout" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
