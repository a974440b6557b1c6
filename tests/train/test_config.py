"""The typed run config: YAML + overrides, refusals that name the key, recipes that load."""
from pathlib import Path

import pytest

from model.config_base import ConfigError
from recipes.train.config import Config, load_config, to_dict, to_yaml
from recipes.config_parsing import CONFIG_DIR, parse_overrides
from recipes.optim.schedules import make_schedule
from recipes.train.cli import keys_help
from tests.helpers import recipe_setting

RECIPES = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_defaults_and_overrides():
    config = load_config(None, ["--optimizer.lr=3e-4", "--train.steps", "7", "--model.size=mini",
                                "--optimizer.schedule.warmup_steps=2", "--mesh.fsdp=-1"])
    assert isinstance(config, Config)
    assert config.optimizer.lr == 3e-4 and isinstance(config.optimizer.lr, float)
    assert config.train.steps == 7
    assert (config.model.n_layer, config.model.d_model) == (4, 256)
    assert config.optimizer.schedule.warmup_steps == 2
    assert config.seq_len == config.model.context_length
    assert config.tokens_per_step == config.data.global_batch * config.seq_len


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'"):
        load_config(None, ["--optimizer.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"'trian'; did you mean 'train'"):
        load_config(None, ["--trian.steps=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'optimizer.schedule.warmup_steps'"):
        load_config(None, ["--optimizer.schedule.warmup=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'gpt2_small'"):
        load_config(None, ["--model.size=gpt2small"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'train.steps' expects int, got str 'ten'"):
        load_config(None, ["--train.steps=ten"])
    with pytest.raises(ConfigError, match=r"'optimizer.lr' expects float, got str 'fast'"):
        load_config(None, ["--optimizer.lr=fast"])
    with pytest.raises(ConfigError, match=r"'logging.progress' expects bool"):
        load_config(None, ["--logging.progress=3"])
    with pytest.raises(ConfigError, match=r"'data.seq_len' expects int or null"):
        load_config(None, ["--data.seq_len=1.5"])


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="optimizer.name must be one of .*, got 'sgd'"):
        load_config(None, ["--optimizer.name=sgd"])
    with pytest.raises(ConfigError, match="train.steps must be an int >= 1, got 0"):
        load_config(None, ["--train.steps=0"])
    with pytest.raises(ConfigError, match="not a multiple of data.micro_batch"):
        load_config(None, ["--data.global_batch=8", "--data.micro_batch=3"])
    with pytest.raises(ConfigError, match="exceeds model.context_length"):
        load_config(None, ["--data.seq_len=1000"])
    with pytest.raises(ConfigError, match="logging.wandb must be one of .*, got 'maybe'"):
        load_config(None, ["--logging.wandb=maybe"])
    with pytest.raises(ConfigError, match="overrides look like --section.key=value"):
        load_config(None, ["steps=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_recipe.yaml")
    # Built without load_config, a warmup longer than the run is refused when its schedule is built.
    config = Config.from_dict({"train": {"steps": 5}, "optimizer": {"schedule": {"warmup_steps": 20}}})
    with pytest.raises(ConfigError, match="warmup_steps=20 exceeds total_steps=5"):
        make_schedule(config.optimizer.schedule, 1.0, total_steps=config.total_steps)


def test_a_warmup_longer_than_a_short_run_is_cut_with_a_note():
    notes = []
    config = load_config("shakespeare_celo2.yaml", ["--train.steps=5"], notes)
    assert config.optimizer.schedule.warmup_steps == 0 and config.train.steps == 5
    assert notes == ["note: optimizer.schedule.warmup_steps=30 does not fit in 5 steps; using 0 (a tenth of the run)"]
    notes.clear()  # a schedule's own total_steps is fitted the same way
    config = load_config(None, ["--optimizer.schedule.total_steps=10", "--optimizer.schedule.warmup_steps=20"], notes)
    assert config.optimizer.schedule.warmup_steps == 1
    assert notes == ["note: optimizer.schedule.warmup_steps=20 does not fit in 10 steps; using 1 (a tenth of the run)"]
    notes.clear()
    config = load_config(None, ["--train.steps=50", "--optimizer.schedule.kind=wsd",
                                "--optimizer.schedule.warmup_steps=45"], notes)
    assert config.optimizer.schedule.warmup_steps == 5 and len(notes) == 1  # 5 + a 10-step decay fit in 50
    notes.clear()
    assert load_config("shakespeare_celo2.yaml", [], notes).optimizer.schedule.warmup_steps == 30 and not notes


def test_base_include_and_anchors(tmp_path: Path):
    (tmp_path / "base.yaml").write_text(
        "_common: &opt {name: adamw, lr: 1.0e-3}\n"
        "optimizer: *opt\ntrain: {steps: 10, seed: 3}\nmodel: {size: tiny}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {steps: 20}\noptimizer: {lr: 2.0e-3}\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.train.steps, config.train.seed) == (20, 3)
    assert (config.optimizer.name, config.optimizer.lr) == ("adamw", 2e-3)


def test_resolved_yaml_round_trips(tmp_path: Path):
    config = load_config(None, ["--optimizer.name=muon", "--data.micro_batch=8"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    assert load_config(path) == config


def test_parse_overrides_values():
    assert parse_overrides(["--a.b=1", "--a.c=x", "--d.e=null", "--d.f=true"]) == {
        "a": {"b": 1, "c": "x"}, "d": {"e": None, "f": True}}
    # 1e5 stays text on the command line: a text key takes it as typed, a number key reads it.
    config = load_config(None, ["--sample.prompt=1e5", "--optimizer.lr=1e-3"])
    assert (config.sample.prompt, config.optimizer.lr) == ("1e5", 1e-3)


def flat_keys(values: dict, prefix: str = "") -> list[str]:
    return [k for name, v in values.items() for k in
            (flat_keys(v, f"{prefix}{name}.") if isinstance(v, dict) else [f"{prefix}{name}"])]


def test_help_lists_every_key_and_its_examples_run():
    import shlex

    import train

    text = keys_help(Config)
    assert not [key for key in flat_keys(to_dict(Config())) if f"\n  {key}=" not in text]
    assert "\n  model.size " in text and "\n  optimizer.routing.rules[].group  (required)" in text
    examples = [line.split() for line in train.__doc__.splitlines() if line.strip().startswith("python train.py")]
    assert len(examples) >= 2
    for example in examples:  # each loads as written (the recipes' own tests train them)
        args, overrides = train.parse_args(shlex.split(" ".join(example))[2:])
        load_config(args.config, overrides)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads(name):
    config = load_config(name.removesuffix(".yaml"))  # a bare name resolves in configs/
    assert config.train.steps == recipe_setting(name, "train", "steps")  # as the recipe or its base writes it


def test_expected_recipes_exist():
    assert "shakespeare_celo2.yaml" in RECIPES


def test_yaml_syntax_error_names_file_line_and_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {size: tiny\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: YAML syntax error: did not find expected"):
        load_config(bad)


# Recipes a user will write sooner or later; each was a traceback, a hang or silently dropped settings.
MALFORMED_RECIPES = {
    "base_number": (b"base: 5\n", "{path}: base must name one recipe (a file name or path), got 5"),
    "base_list": (b"base: [a.yaml, b.yaml]\n", "{path}: base must name one recipe (a file name or path), got ['a.yaml'"),
    "not_utf8": (b"model:\n  n_head: 4\n# caf\xe9\n", "{path} is not UTF-8 text (byte 0xe9 at offset 24)"),
    "recursive_alias": (b"_loop: &loop [1, *loop]\n", "{path}:1: a YAML alias refers to a value that contains it"),
    "alias_bomb": (b"".join(b"_%d: &a%d [%s]\n" % (i, i, b", ".join([b"*a%d" % (i - 1) if i else b"x"] * 10))
                            for i in range(12)), "{path}: its YAML aliases expand to more than 100,000 values"),
    "section_as_a_value": (b"train: 5\n", "config section train must be a mapping of keys, got 5"),
}


@pytest.mark.parametrize("args, expected", [
    (["--config", "{bad}", "--dry-run"], "error: {bad}:2:1: YAML syntax error"),
    (["--optimizer.theta={theta}", "--train.steps=2"], "error: {theta}: not a readable theta.state"),
    *[(["--config", f"{{{name}}}", "--train.steps=2", "--dry-run"], "error: " + text.replace("{path}", f"{{{name}}}"))
      for name, (_, text) in MALFORMED_RECIPES.items()],
], ids=["yaml_syntax", "theta", *MALFORMED_RECIPES])
def test_ordinary_mistakes_end_in_one_error_line(tmp_path, args, expected):
    import subprocess
    import sys

    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    (tmp_path / "theta.state").write_bytes(b"not msgpack at all")
    values = {"bad": tmp_path / "bad.yaml", "theta": tmp_path / "theta.state"}
    for name, (content, _) in MALFORMED_RECIPES.items():
        values[name] = tmp_path / f"{name}.yaml"
        values[name].write_bytes(content)
    args = [a.format(**values) for a in args] + [f"--train.out_dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=CONFIG_DIR.parent, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected.format(**values)), result.stderr
    assert not (tmp_path / "run").exists()


def test_only_true_and_false_are_booleans_and_choices_name_the_choices():
    # YAML 1.1 reads on/off/yes/no as booleans: "--logging.wandb=on" reached the config as True.
    with pytest.raises(ConfigError, match=r"logging.wandb must be one of \['disabled', 'offline', 'online'\], got 'on'"):
        load_config(None, ["--logging.wandb=on"], [])
    with pytest.raises(ConfigError, match=r"model.compute_dtype must be one of \['float32', 'bfloat16'\], got 'fp16'"):
        load_config(None, ["--model.compute_dtype=fp16"], [])
    assert load_config(None, ["--model.bias=False"], []).model.bias is False
