import pytest

from ddpmkit.config import PRESET_DIR, ConfigError, load_config, parse_overrides


def test_presets_load():
    for preset in PRESET_DIR.glob("*.toml"):
        load_config(preset)
    cfg = load_config(PRESET_DIR / "mnist.toml", ["train.lr=1e-3", "network.channel_mult=1,2,2", "data.hflip=true"])
    assert cfg.train.lr == 1e-3 and cfg.network.channel_mult == (1, 2, 2) and cfg.data.hflip is True


def test_misspelt_key_suggests_the_right_one(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rate = 0.1\nstep = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key in \[train\]: 'train.learning_rate'.*valid: .*lr"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"did you mean 'train.steps'"):
        load_config(None, ["train.stepz=5"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(None, ["trian.lr=5"])


def test_bad_values():
    with pytest.raises(ConfigError, match=r"diffusion.schedule = 'cosin'.*did you mean 'cosine'"):
        load_config(None, ["diffusion.schedule=cosin"])
    with pytest.raises(ConfigError, match="not a valid int"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["lr=3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.toml")
    with pytest.raises(ConfigError, match=r"train.ema_decay = 1.0 must be in \[0, 1\)"):
        load_config(None, ["train.ema_decay=1"])
