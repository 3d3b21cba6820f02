"""Every config composes against the schema; typos fail at composition."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from medusa_train.config import register_configs

CONF = Path(__file__).resolve().parent.parent / "conf"
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))

register_configs()


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(recipe):
    cfg = _compose([f"+recipe={recipe}"])
    assert cfg.recipe.name == recipe
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


@pytest.mark.parametrize("group", ["model", "data", "heads", "train", "logger"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = _compose(["+recipe=medusa1", f"{group}={option}"])
        assert cfg[group] is not None


def test_overrides_apply():
    cfg = _compose(["+recipe=medusa1", "heads.num_heads=5", "train.max_steps=7", "logger=none"])
    assert cfg.heads.num_heads == 5 and cfg.train.max_steps == 7 and cfg.logger.backend == "none"
    assert cfg.output_dir == "runs/medusa1"


def test_typo_in_key_fails():
    with pytest.raises(Exception, match="max_stepz"):
        _compose(["+recipe=medusa1", "train.max_stepz=3"])


def test_wrong_type_fails():
    with pytest.raises(Exception, match="num_heads"):
        _compose(["+recipe=medusa1", "heads.num_heads=many"])
