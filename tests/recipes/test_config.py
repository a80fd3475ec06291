import pytest

from masklab.recipes.config import CONFIG_DIR, TrainConfig, load_config, save_config


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
