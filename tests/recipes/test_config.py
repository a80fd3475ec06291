import pytest

from masklab.objectives import MAEOptions, SimMIMOptions, SupervisedOptions
from masklab.recipes.cli import main
from masklab.recipes.config import CONFIG_DIR, TrainConfig, load_config, save_config
from masklab.transforms import AttentionMaskOptions, BlockMaskOptions, FeatureMaskOptions, MaskOptions


def test_every_recipe_loads():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"mae", "simmim", "supervised", "linear", "knn", "finetune"} <= set(names)
    for name in names:
        assert isinstance(load_config(name), TrainConfig)


def test_round_trip_with_overrides(tmp_path):
    cfg = load_config("mae", ["optim.lr=0.02", "run.epochs=3", "model.kwargs={depth: 2}", "data.scale=[0.5,1.0]"])
    assert (
        cfg.optim.lr == 0.02
        and cfg.run.epochs == 3
        and cfg.model.kwargs == {"depth": 2}
        and cfg.data.scale == [0.5, 1.0]
    )
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.lrr=1", r"unknown config key 'optim.lrr'.*Did you mean"),
        ("nope=1", r"unknown config key 'nope'"),
        ("optim.lr=abc", r"bad value for config key 'optim.lr'"),
        ("run.epochs=2.5", r"bad value for config key 'run.epochs'"),
        ("task=dance", r"task must be one of .* got 'dance'"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("mae", [override])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match=r"no config 'maee'.*'mae'"):
        load_config("maee")


def test_override_without_equals_is_an_error():
    with pytest.raises(ValueError, match="key=value"):
        load_config("mae", ["optim.lr"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("run.epochs=0", "run.epochs must be at least 1, got 0"),
        ("run.ckpt_every=0", "run.ckpt_every must be at least 1, got 0"),
        ("optim.grad_accum=0", "optim.grad_accum must be at least 1, got 0"),
        ("run.keep=0", "run.keep must be at least 1, got 0"),
        ("run.keep=-2", "run.keep must be at least 1, got -2"),
        ("run.max_steps=0", "run.max_steps must be at least 1, got 0"),
        ("data.batch_size=0", "data.batch_size must be at least 1, got 0"),
        ("mask.ratio=0", "mask.ratio must lie strictly between 0 and 1 for the 'random' mask, got mask.ratio=0.0"),
        ("mask.ratio=1", "mask.ratio must lie strictly between 0 and 1 for the 'random' mask, got mask.ratio=1.0"),
    ],
)
def test_values_that_cannot_run_are_refused_at_load_naming_key_and_value(override, message):
    with pytest.raises(ValueError) as error:
        load_config("mae", [override])
    assert message in str(error.value)


def test_null_settings_that_mean_off_stay_allowed():
    cfg = load_config("supervised", ["run.max_steps=null", "mask.ratio=0"])  # no mask stage in a supervised run
    assert cfg.run.max_steps is None and cfg.mask == MaskOptions(name="none")  # ratio: another stage's option


def test_each_section_holds_the_options_of_the_entry_its_name_selects():
    cfg = load_config("mae_amt")
    assert cfg.mask == AttentionMaskOptions(name="amt", ratio=0.45, throw_ratio=0.40)
    assert cfg.objective == MAEOptions(
        name="mae", decoder_dim=128, decoder_depth=2, norm_pix=True, fixed_pos_embed=False
    )
    # The recipe's keys that another entry takes are dropped when the name changes; the new entry's defaults fill in.
    switched = load_config("mae_amt", ["mask.name=block", "objective.name=simmim"])
    assert switched.mask == BlockMaskOptions(name="block", ratio=0.45)
    assert switched.objective == SimMIMOptions(name="simmim")
    assert load_config("supervised").objective == SupervisedOptions(mixmask=True, mixmask_grid=4, erase_ratio=0.25)


@pytest.mark.parametrize(
    "override,message",
    [
        ("mask.ratoi=0.5", "unknown config key 'mask.ratoi': the 'random' mask takes name, ratio, throw_ratio"),
        ("mask.ratoi=0.5", "Did you mean 'ratio'"),
        ("objective.decoder_dimm=8", "unknown config key 'objective.decoder_dimm'"),
        ("objective.decoder_dimm=8", "Did you mean 'decoder_dim'"),
        ("mask.name=blok", "bad value for config key 'mask.name': unknown mask 'blok'; did you mean 'block'"),
        ("objective.name=moco2", "bad value for config key 'objective.name': unknown objective 'moco2'"),
    ],
)
def test_unknown_keys_and_names_of_a_registry_section_are_named_with_close_matches(override, message):
    with pytest.raises(ValueError) as error:
        load_config("mae", [override])
    assert message in str(error.value)


def test_a_saved_section_reads_back_as_its_options_dataclass(tmp_path):
    cfg = load_config("maskdeep", ["mask.groups=2"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and isinstance(again.mask, FeatureMaskOptions) and again.mask.strides == [2, 4, 8]


@pytest.mark.parametrize(
    "override,right",
    [
        ("model.kwargs={depth:2}", 'model.kwargs="{depth: 2}"'),
        ("model.kwargs={depth:2, embed_dim:32}", 'model.kwargs="{depth: 2, embed_dim: 32}"'),
    ],
)
def test_kwargs_without_a_space_after_the_colon_are_refused_with_the_right_form(override, right):
    with pytest.raises(ValueError) as error:
        load_config("mae", [override])
    assert str(error.value) == (
        f"model.kwargs key 'depth:2' has no value: YAML needs a space after the colon; write {right}"
    )


def test_kwargs_with_a_null_value_are_refused():
    with pytest.raises(ValueError, match=r"model.kwargs key 'depth' has no value \(timm would ignore it\)"):
        load_config("mae", ["model.kwargs={depth: null}"])


def test_kwargs_masklab_sets_itself_are_refused_naming_the_config_key():
    with pytest.raises(
        ValueError, match=r"model.kwargs key 'img_size' is one masklab sets itself, from data.resolution"
    ):
        load_config("mae", ["model.kwargs={img_size: 64}"])


def test_an_override_that_is_not_yaml_is_named_with_the_spaced_form():
    with pytest.raises(ValueError) as error:
        load_config("mae", ["run.seed=1", "model.kwargs={channels:[8,16]}"])
    assert str(error.value) == (
        "override 'model.kwargs={channels:[8,16]}' is not valid YAML (found unexpected ':'); "
        'YAML needs a space after each colon: model.kwargs="{channels: [8,16]}"'
    )


def test_optimizer_options_from_dotted_overrides():
    cfg = load_config("moco", ["optim.name=adamw", "optim.betas=[0.9,0.95]", "optim.decay_bias_and_norm=false"])
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.decay_bias_and_norm is False
    assert load_config("mae").optim.betas == [0.9, 0.95]  # MAE's betas in its recipe
    assert load_config("moco").optim.decay_bias_and_norm is True  # MoCo decays every parameter


def test_base_lr_given_later_replaces_the_recipes_lr_and_the_other_way_round(tmp_path):
    cfg = load_config("mae", ["optim.base_lr=1.5e-4"])
    assert (cfg.optim.lr, cfg.optim.base_lr) == (None, 1.5e-4)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    again = load_config(tmp_path / "c.yaml", ["optim.lr=0.01"])
    assert (again.optim.lr, again.optim.base_lr) == (0.01, None)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.betas=[0.9]"], r"optim.betas must be 2 numbers in \[0, 1\), got \[0.9\]"),
        (["optim.betas=[0.9,1.0]"], r"optim.betas must be 2 numbers in \[0, 1\), got \[0.9, 1.0\]"),
        (["optim.betas=[-0.1,0.9]"], r"optim.betas must be 2 numbers in \[0, 1\), got \[-0.1, 0.9\]"),
        (["optim.betas=abc"], r"bad value for config key 'optim.betas'"),
        (
            ["optim.name=momentum", "optim.betas=[0.9,0.95]"],
            r"optim.betas=\[0.9, 0.95\] is for .* 'momentum' takes none",
        ),
        (["optim.name=adamww"], r"optim.name 'adamww' is not a timm optimizer; did you mean 'adamw'"),
        (["optim.lr=0.1", "optim.base_lr=1e-4"], r"optim.lr=0.1 and optim.base_lr=0.0001 are exclusive"),
        (["optim.lr=null"], r"give exactly one of optim.lr .* and optim.base_lr .*got neither"),
        (["optim.base_lr=-1e-4"], r"optim.base_lr must be positive, got -0.0001"),
        (["optim.decay_bias_and_norm=maybe"], r"bad value for config key 'optim.decay_bias_and_norm'"),
    ],
)
def test_bad_optimizer_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("mae", overrides)


def test_the_command_line_names_bad_betas_before_training(tmp_path, capsys):
    assert main(["train", "mae", "optim.betas=[0.9]", f"run.out={tmp_path}"]) == 2
    assert "optim.betas must be 2 numbers in [0, 1), got [0.9]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
