"""Encoders out: a trained encoder exported as a timm folder loads in plain timm, without masklab."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from masklab.recipes.build import encoder_of
from masklab.recipes.config import load_config
from masklab.recipes.export import export_encoder, plain_timm_state
from masklab.recipes.train import train
from masklab.recipes.trained import load_trained

RUN = ["data.resolution=16", "data.length=64", "data.batch_size=16", "run.max_steps=2", "run.progress=false"]
RUN += ["eval.at_end=false", "run.epochs=1"]
VIT = ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "objective.decoder_dim=32", "objective.decoder_depth=1"]
CNN = ["objective.proj_hidden=32", "objective.proj_dim=16", "objective.pred_hidden=32"]

# Runs with masklab made unimportable: only timm, torch and safetensors. Each load, in its own namespace,
# binds `model`; one process reads them all (each process pays torch's and timm's imports).
PLAIN_TIMM = """
import sys
sys.modules["masklab"] = None
import timm, torch
features = []
for load in {loads!r}:
    scope = {{"timm": timm, "torch": torch}}
    exec(load, scope)
    model = scope["model"].eval()
    torch.manual_seed(0)
    x = torch.rand(4, 3, {size}, {size})
    with torch.no_grad():
        features.append(model(x))
torch.save(features, sys.argv[1])
"""


def features_in_plain_timm(tmp_path, loads: list[str], size: int) -> list[torch.Tensor]:
    """The features of each ``load``'s model (code binding ``model``) on the same input, in one plain-timm process."""
    script, out = tmp_path / "plain.py", tmp_path / "features.pt"
    script.write_text(PLAIN_TIMM.format(loads=[textwrap.dedent(load) for load in loads], size=size))
    run = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


def masklab_features(checkpoint, size: int, part: str = "encoder") -> torch.Tensor:
    cfg, model = load_trained(checkpoint)
    encoder = encoder_of(model)
    if part == "teacher":
        encoder = next(m for m in model.momentum.module.modules() if type(m) is type(model.backbone))
    torch.manual_seed(0)
    x = torch.rand(4, 3, size, size)
    with torch.no_grad():
        return encoder.eval()(x)


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("mae")
    return train(load_config("mae", [*RUN, *VIT, f"run.out={out}"])).checkpoint


def test_vit_export_loads_in_plain_timm_with_equal_features(mae_checkpoint, tmp_path):
    folder = export_encoder(mae_checkpoint, tmp_path / "vit")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"] == {
        "depth": 1,
        "embed_dim": 32,
        "num_heads": 2,
        "num_classes": 0,
        "img_size": 16,
        "patch_size": 4,
    }
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert not any(k.startswith(("decoder", "mask_token", "teacher")) for k in load_file(folder / "model.safetensors"))
    expected = masklab_features(mae_checkpoint, 16)
    local, overlay = features_in_plain_timm(
        tmp_path,
        [
            f'model = timm.create_model("local-dir:{folder}", pretrained=True)',
            f"""model = timm.create_model("vit_tiny_patch16_224", pretrained=True,
            pretrained_cfg_overlay=dict(file="{folder}/model.safetensors"), **{config["model_args"]!r})""",
        ],
        16,
    )
    torch.testing.assert_close(local, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(overlay, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("small_stem", [False, True])
def test_cnn_export_and_its_teacher_load_in_plain_timm(tmp_path, small_stem):
    run = train(load_config("byol", [*RUN, *CNN, f"model.small_stem={small_stem}", f"run.out={tmp_path / 'run'}"]))
    loads, expected = [], []
    for part in ("encoder", "teacher"):
        folder = export_encoder(run.checkpoint, tmp_path / part, include=part)
        readme = (folder / "README.md").read_text()
        load = readme.split("```python\n")[1].split("```")[0]
        if not small_stem:
            load = load.split("# or")[0]  # the local-dir line
        loads.append(load)
        expected.append(masklab_features(run.checkpoint, 16, part))
    for got, want in zip(features_in_plain_timm(tmp_path, loads, 16), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert json.loads((folder / "config.json").read_text()).get("masklab_small_stem", False) is small_stem


def test_export_errors_name_the_problem(mae_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="include must be one of"):
        export_encoder(mae_checkpoint, tmp_path / "x", include="decoder")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("data")
    with pytest.raises(ValueError, match="not empty"):
        export_encoder(mae_checkpoint, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "data"


def test_plain_timm_state_refuses_a_weight_it_cannot_place():
    feature = torch.nn.Sequential(torch.nn.Linear(2, 3))
    plain = torch.nn.Sequential(torch.nn.Linear(2, 4))
    with pytest.raises(ValueError, match="cannot place the feature weight '0.weight'"):
        plain_timm_state(feature, plain)


def test_cli_export_then_eval_and_finetune_from_the_folder(mae_checkpoint, tmp_path, capsys):
    from masklab.recipes.build import build_model
    from masklab.recipes.cli import main
    from masklab.recipes.train import evaluate_checkpoint

    folder = tmp_path / "exported"
    assert main(["export", str(mae_checkpoint), str(folder)]) == 0
    assert f"local-dir:{folder}" in capsys.readouterr().out
    data = ["data.length=64", "data.batch_size=16"]
    # The export's encoder is the checkpoint's: equal kNN accuracy on the same data.
    assert evaluate_checkpoint(folder, "knn", data) == evaluate_checkpoint(mae_checkpoint, "knn", data)
    vit = "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"
    model = build_model(load_config("finetune", [*RUN, f"model.init={folder}", vit]))
    state = model.model.state_dict()
    for key, value in load_file(folder / "model.safetensors").items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)
    assert "head.weight" in state  # the classifier is new
