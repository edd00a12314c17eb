import math
import re

import pytest

from ddpmkit.config import (
    BUILTIN_TASKS,
    PRESET_DIR,
    READ_ONLY_WHEN,
    SECTION_READ_BY,
    SECTIONS,
    Config,
    ConfigError,
    build_config,
    load_config,
    parse_overrides,
    preset_names,
)


def test_presets_load():
    needs = {"sd_lora": ["train.init_from=models/sd"]}  # presets that fine-tune a model the user names
    for preset in PRESET_DIR.glob("*.toml"):
        load_config(preset, needs.get(preset.stem, []))
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
    # true/false for a number was Python's 1/0 (train.posthoc_ema=true became the width 1.0, train.steps=true one step),
    # and a number other than 0/1 for a switch was True
    for override, message in (("train.steps=true", r"train.steps = True must be a number, not true or false"),
                              ("train.lr=false", r"train.lr = False must be a number"),
                              ("train.posthoc_ema=true", r"train.posthoc_ema = True must be a list of numbers, not true or false"),
                              ("network.channel_mult=[1,true]", r"network.channel_mult = \[1, True\] must be a list of numbers"),
                              ("train.keep_steps=[250,-5]", r"train.keep_steps = \[250, -5\] must be steps >= 1"),
                              ("data.hflip=5", r"data.hflip = 5 is not a valid bool"), ("data.hflip=0.5", r"data.hflip = 0.5 is not a valid bool")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    assert load_config(None, ["data.hflip=1"]).data.hflip is True and load_config(None, ["data.hflip=false"]).data.hflip is False
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.toml")
    with pytest.raises(ConfigError, match=r"train.ema_decay = 1.0 must be in \[0, 1\)"):
        load_config(None, ["train.ema_decay=1"])
    # the network's and data's sizes: before, a zero width or head count ended in torch's traceback and dropout 1.5 in a ValueError
    for override, message in (("network.base_channels=0", r"network.base_channels = 0 must be >= 1"),
                              ("network.num_heads=0", r"network.num_heads = 0 must be >= 1"),
                              ("network.num_classes=-1", r"network.num_classes = -1 must be >= 0"),
                              ("network.channel_mult=[]", r"network.channel_mult = \[\] must be one width multiple >= 1 per level"),
                              ("network.channel_mult=[1,0]", r"network.channel_mult = \[1, 0\] must be"),
                              ("network.dropout=1.5", r"network.dropout = 1.5 must be in \[0, 1\)"),
                              ("network.dropout=-0.1", r"network.dropout = -0.1 must be in \[0, 1\)"),
                              ("data.image_size=0", r"data.image_size = 0 must be >= 1"), ("data.channels=2", r"data.channels = 2 must be 1"),
                              ("diffusion.min_snr_gamma=-1", r"diffusion.min_snr_gamma = -1.0 must be >= 0"),
                              # every float setting is finite: NaN or inf weights trained NaN losses or were ignored silently
                              ("diffusion.min_snr_gamma=nan", r"diffusion.min_snr_gamma = nan must be a finite number"),
                              ("diffusion.sigma_data=inf", r"diffusion.sigma_data = inf must be a finite number"),
                              ("train.max_minutes=nan", r"train.max_minutes = nan must be a finite number"),
                              ("train.adam_betas=[0.9,nan]", r"train.adam_betas = nan must be a finite number"),
                              ("diffusion.zero_terminal_snr=true diffusion.prediction=eps diffusion.precondition=none",
                               r"zero_terminal_snr = true with prediction = 'eps': an eps model")):
        with pytest.raises(ConfigError, match=message):
            load_config("mnist", override.split())
    assert load_config("mnist", ["network.num_res_blocks=0", "network.dropout=0"]).network.num_res_blocks == 0  # the bounds are valid
    assert load_config(None, ["diffusion.zero_terminal_snr=true", "diffusion.prediction=v"]).diffusion.zero_terminal_snr


def test_a_config_extends_a_preset_and_overrides_its_keys(tmp_path):
    child = tmp_path / "child.toml"
    child.write_text('extends = "mnist"\n[train]\nsteps = 5\nrun_dir = "runs/child"\n')
    assert load_config(child) == load_config("mnist", ["train.steps=5", "train.run_dir=runs/child"])
    grandchild = tmp_path / "grandchild.toml"
    grandchild.write_text(f'extends = "{child}"\n[network]\nbase_channels = 16\n')
    assert load_config(grandchild) == load_config("mnist", ["train.steps=5", "train.run_dir=runs/child", "network.base_channels=16"])
    loop = tmp_path / "loop.toml"
    loop.write_text(f'extends = "{loop}"\n')
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(loop)
    child.write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="extends takes the name of a preset"):
        load_config(child)
    child.write_text('extends = "no_such_preset"\n')
    with pytest.raises(ConfigError, match="config file not found: no_such_preset; presets: "):
        load_config(child)
    run = tmp_path / "run"  # a run folder stands for its config.json, as `sample RUN` and train.init_from=RUN take it
    run.mkdir()
    (run / "config.json").write_text(load_config("mnist_class", ["train.steps=7"]).to_json())
    assert load_config(run) == load_config(run / "config.json") == load_config("mnist_class", ["train.steps=7"])
    with pytest.raises(ConfigError, match=r"is a folder without a config.json \(a run folder holds one\); presets: "):
        load_config(tmp_path)  # a folder without one
    with pytest.raises(ConfigError, match=r"config file not found: mnsit \(did you mean 'mnist'\?\); presets: "):
        load_config("mnsit")
    # UTF-8 on every system (the locale's encoding was read before), a Windows editor's byte-order mark dropped (it was
    # "Invalid statement (at line 1, column 1)"), another encoding one line (it was a UnicodeDecodeError traceback)
    child.write_text('\ufeffextends = "mnist"\n[train]\nsteps = 5\nrun_dir = "runs/caf\u00e9"\n', encoding="utf-8")
    assert load_config(child) == load_config("mnist", ["train.steps=5", "train.run_dir=runs/caf\u00e9"])
    child.write_text('extends = "mnist"\n[train]\nrun_dir = "runs/caf\u00e9"\n', encoding="cp1252")
    with pytest.raises(ConfigError, match=r".*child.toml is not UTF-8 text \(byte 0xe9 at 45\); save it as UTF-8"):
        load_config(child)


@pytest.mark.parametrize("preset", ["mnist_progressive", "mnist_progressive_guided", "mnist_consistency"])
def test_the_distillation_presets_have_the_demo_models_settings(preset):
    """A student must have its teacher's network, diffusion and data settings (DistillationTask checks them):
    the presets distil the demo model (the mnist preset, in runs/demo)."""
    cfg, demo = load_config(preset), load_config("mnist")
    assert (cfg.network, cfg.diffusion, cfg.data) == (demo.network, demo.diffusion, demo.data)
    assert cfg.train.task == preset.split("_")[1] and cfg.distill.teacher == "runs/demo"
    if cfg.distill.autoguide:  # the weaker model is the checkpoint the demo keeps for autoguidance
        assert cfg.distill.autoguide in [f"runs/demo/ckpt-{step:07d}" for step in demo.train.keep_steps]


@pytest.mark.parametrize("override, taken", [
    # each bound's end: taken where the message says "<=" or ">=", refused one step past it (tests/mutants.py --kinds bounds)
    ("data.image_size=1", True), ("diffusion.logit_normal_std=0", False), ("diffusion.log_normal_std=0", False),
    ("diffusion.sigma_data=0", False), ("diffusion.asymmetric_k=0", False), ("diffusion.asymmetric_k=0.5", True),
    ("train.batch_size=1", True), ("train.log_every=1", True), ("train.num_samples=1", True), ("train.sample_steps=1", True),
    ("network.dropout=0", True), ("network.dropout=1", False),
    ("superres.low_res=1", True), ("superres.low_res=0", False), ("superres.aug_level=0", True), ("superres.aug_level=1", True),
    ("superres.aug_max=0", True), ("superres.aug_max=1", True), ("superres.blur_prob=1", True), ("superres.blur_sigma=[0,0]", True),
    ("superres.blur_sigma=[0.6,0.4]", False), ("clip.embed_dim=2", True), ("clip.embed_dim=1", False), ("clip.text_hidden=1", True),
    ("clip.init_temperature=0", False), ("unclip.embed_dim=2", True), ("unclip.embed_tokens=1", True), ("unclip.prior_layers=1", True),
    ("train.keep_steps=[1]", True), ("train.keep_steps=[0]", False), ("train.seed=0", True), (f"train.seed={2**40 - 1}", True),
    (f"train.seed={2**40}", False), (f"train.batch_size={2**20}", True), (f"train.batch_size={2**20 + 1}", False),
    ("train.max_minutes=0", True), ("train.max_minutes=inf", False), ("train.lr=0", False), ("train.adam_betas=[0,0.999]", True),
    ("train.adam_betas=[0.9,1.0]", False), ("train.cond_drop_prob=1", True), ("train.cond_drop_prob=0", True),
    (f"train.posthoc_ema=[0.05,{12**-0.5!r}]", False), ("train.posthoc_ema=[0,0.1]", False), ("train.posthoc_ema=[0.05,0.2886]", True),
    ("train.posthoc_every=1", True), ("train.budget_calibration=11", True), ("train.budget_calibration=10", False),
    ("train.nan_patience=1", True), ("train.max_rollbacks=0", True), ("distill.points=2", True), ("distill.points=1", False),
    ("distill.autoguide_scale=0", True), ("distill.autoguide_scale=inf", False), ("dreambooth.class_steps=1", True),
    ("dreambooth.class_steps=0", False), ("dreambooth.prior_loss_weight=0", True),
])
def test_each_bound_of_the_config_at_its_end(override, taken):
    values = parse_overrides([override])  # built alone: a default config need not read the key (check_overrides_are_read)
    if taken:
        build_config(values)
    else:
        with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[1]):  # the message names the key
            build_config(values)


def test_a_config_built_in_python_refuses_infinite_numbers_as_the_loader_does():
    from ddpmkit.config import DistillConfig, TrainConfig

    for build, key in ((lambda: TrainConfig(max_minutes=math.inf), "max_minutes"),
                       (lambda: DistillConfig(autoguide_scale=math.inf), "autoguide_scale")):
        with pytest.raises(ConfigError, match=key):
            build()


# each key a config reads only under a condition: a value for it, overrides of the default config under which it would not
# be read, and overrides under which it would
OFF = []
READ_CASES = [
    ("data.path", "photos", OFF, ["data.name=folder"]), ("data.path", "d.npz", OFF, ["data.name=npz"]),
    ("data.image_size", "32", OFF, ["data.name=folder"]), ("data.channels", "1", OFF, ["data.name=folder"]),
    ("diffusion.sigma_data", "0.7", OFF, ["diffusion.precondition=edm", "diffusion.prediction=x0"]),
    ("diffusion.sigma_data", "0.7", OFF, ["diffusion.loss_weighting=edm"]),
    ("diffusion.min_snr_gamma", "5", ["diffusion.loss=vlb"], OFF),
    *((f"diffusion.{kind}_{name}", "0.5", OFF, [f"diffusion.timestep_sampling={kind}"])
      for kind in ("logit_normal", "log_normal") for name in ("mean", "std")),
    ("diffusion.asymmetric_k", "2", OFF, ["diffusion.timestep_sampling=asymmetric"]),
    ("diffusion.asymmetric_log_snr", "-3", OFF, ["diffusion.timestep_sampling=asymmetric"]),
    ("train.posthoc_every", "5", OFF, ["train.posthoc_ema=[0.1]"]),
    ("train.budget_calibration", "20", OFF, ["train.fit_to_budget=true", "train.max_minutes=5"]),
    ("train.fit_to_budget", "true", OFF, ["train.max_minutes=5"]),
    ("train.cond_drop_prob", "0.2", OFF, ["network.num_classes=10"]), ("train.cond_drop_prob", "0.2", OFF, ["network.text_encoder=x"]),
    ("train.lora_alpha", "8", OFF, ["train.lora_rank=4", "train.init_from=runs/demo"]),
    ("train.lora_targets", "qkv", OFF, ["train.lora_rank=4", "train.init_from=runs/demo"]),
    *((f"network.{name}", value, ["network.kind=mlp"], OFF) for name, value in (
        ("base_channels", "8"), ("channel_mult", "[1,2]"), ("num_res_blocks", "2"), ("attention_resolutions", "[14]"), ("num_heads", "2"),
        ("patch_size", "2"), ("narrow_upsampling", "true"))),
    *((f"network.{name}", "3", OFF, ["network.kind=mlp"]) for name in ("mlp_hidden", "mlp_layers")),
    *((f"dreambooth.{name}", value, OFF, ["dreambooth.instance_prompt=a sks digit"]) for name, value in (
        ("prior_loss_weight", "0.5"), ("class_sampler", "ddim"), ("class_steps", "5"),
        ("class_guidance", "2"))),
]


@pytest.mark.parametrize("key, value, unread, reads", READ_CASES)
def test_a_command_lines_key_that_its_config_would_not_read_is_refused(key, value, unread, reads):
    """`train mnist data.path=my_photos` trained on the digits; now each key of READ_ONLY_WHEN given where the config
    would not read it is one line naming the condition and the config's value, and taken where it would."""
    rule = READ_ONLY_WHEN[key]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} is read only with {re.escape(rule.condition)}; this config has "
                                          rf"{re.escape(rule.governs)} = .* and would train without it"):
        load_config(None, [*unread, f"{key}={value}"])
    section, name = key.split(".")
    taken = getattr(getattr(load_config(None, [*reads, f"{key}={value}"]), section), name)
    saved = getattr(getattr(build_config(parse_overrides([*unread, f"{key}={value}"])), section), name)  # a run's config.json: every key
    assert taken == saved != getattr(getattr(Config(), section), name)


def test_a_task_of_its_own_may_read_any_network_key():
    """The network rules hold for the denoiser, which builds network.kind's network; a registered kind (tests/test_kinds.py)
    or a classifier builds its own and may read, say, mlp_hidden beside a UNet's kind."""
    assert load_config(None, ["train.task=classifier", "network.mlp_hidden=3"]).network.mlp_hidden == 3


@pytest.mark.parametrize("section, key", [("distill", "points=3"), ("superres", "low_res=7"), ("autoencoder", "kl_weight=0.5"),
                                          ("clip", "embed_dim=8"), ("unclip", "embed_dim=8")])
def test_a_section_that_other_tasks_read_is_refused_for_the_denoiser(section, key):
    """`train mnist distill.points=3` trained a plain denoiser; a task of one's own (registered under its name) may read any section."""
    tasks = SECTION_READ_BY[section]
    with pytest.raises(ConfigError, match=rf"^{section}\.{key.split('=')[0]} is read only with train.task = {' or '.join(tasks)}; "
                                          "this config has train.task = 'denoiser'"):
        load_config(None, [f"{section}.{key}"])
    name, value = key.split("=")
    for task in (*tasks, "my_own_task"):
        assert getattr(getattr(load_config(None, [f"train.task={task}", f"{section}.{key}"]), section), name) == float(value)


def test_the_built_in_tasks_are_the_ones_the_config_names():
    from ddpmkit.train import TASKS

    assert set(BUILTIN_TASKS) == {name for name, task in TASKS.items() if task.__module__.startswith("ddpmkit.")}
    assert set(SECTION_READ_BY) | {"data", "diffusion", "network", "train", "dreambooth"} == set(SECTIONS)


def test_a_key_switched_off_is_taken_where_it_would_not_be_read():
    """A key at its default changes nothing, so a script may always give it: train.fit_to_budget=false with no budget
    (bench/two_processes.py gives it beside one), data.path= for the digits. And train.cond_drop_prob=0 needs no condition."""
    assert not load_config(None, ["train.fit_to_budget=false"]).train.fit_to_budget
    assert load_config("mnist", ["data.path="]).data.path == ""
    assert load_config(None, ["train.cond_drop_prob=0"]).train.cond_drop_prob == 0  # docs/cascade.md's unconditional base


def test_a_users_own_config_file_is_checked_as_the_command_line_is(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "mnist"\n[data]\npath = "photos"\n')
    with pytest.raises(ConfigError, match=r"^data\.path is read only with data\.name = folder or npz; this config has data\.name = 'mnist5k'"):
        load_config(mine)
    mine.write_text('extends = "mnist"\n[data]\nname = "folder"\npath = "photos"\n')
    assert load_config(mine).data.path == "photos"
    saved = tmp_path / "config.json"  # a run's config holds every key, read or not (toy2d's sigma_data, posthoc_every, ...)
    saved.write_text(load_config("toy2d").to_json())
    assert load_config(saved) == load_config("toy2d")


@pytest.mark.parametrize("preset", sorted(set(preset_names()) - {"sd_lora"}))  # (sd_lora needs train.init_from to load at all)
def test_a_preset_copied_whole_into_a_file_of_ones_own_loads_as_the_preset(preset, tmp_path):
    copy = tmp_path / "copy.toml"
    copy.write_text((PRESET_DIR / f"{preset}.toml").read_text())
    assert load_config(copy) == load_config(preset)


def test_every_key_read_only_under_a_condition_is_tested():
    assert {case[0] for case in READ_CASES} == set(READ_ONLY_WHEN)
