from pathlib import Path

import pytest

from recipes.metatrain.config import MetaTrainConfig

FAMILY = [{"kind": "image_mlp"}]


def test_unknown_key_names_the_closest():
    with pytest.raises(ValueError, match="did you mean 'metatrain.outer_steps'"):
        MetaTrainConfig.from_dict({"metatrain": {"outer_step": 3}, "families": FAMILY})
    with pytest.raises(ValueError, match="did you mean 'pes'"):
        MetaTrainConfig.from_dict({"pess": {}, "families": FAMILY})
    with pytest.raises(ValueError, match=r"did you mean 'families\[0\].context_length'"):
        MetaTrainConfig.from_dict({"families": [{"kind": "lm", "context": 8}]})


def test_validation():
    with pytest.raises(ValueError, match="even"):
        MetaTrainConfig.from_dict({"pes": {"particles": 3}, "families": FAMILY})
    with pytest.raises(ValueError, match="no task families"):
        MetaTrainConfig.from_dict({})
    with pytest.raises(ValueError, match="unique"):
        MetaTrainConfig.from_dict({"families": FAMILY * 2})


def test_yaml_numbers_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metatrain:\n  outer_lr: 5e-5\nfamilies:\n  - kind: image_mlp\n")
    config = MetaTrainConfig.from_file(path, ["--metatrain.outer_steps=7", "--metatrain.out_dir=x"])
    assert config.metatrain.outer_lr == 5e-5 and config.metatrain.outer_steps == 7
    assert config.metatrain.out_dir == "x"


def test_lm_sampler_is_deterministic():
    values = {"lm_sampler": {"count": 5, "seed": 3}}
    names = [f.name for f in MetaTrainConfig.from_dict(values).all_families()]
    assert names == [f.name for f in MetaTrainConfig.from_dict(values).all_families()]
    assert len(set(names)) == 5


def test_family_names_are_derived_and_help_lists_the_keys():
    from recipes.train.cli import keys_help
    from recipes.metatrain.config import FamilyConfig

    assert FamilyConfig(kind="lm", n_layer=2, d_model=48, context_length=16).name == "lm_l2_d48_c16"
    assert MetaTrainConfig.from_dict({"families": [{"hidden": [8]}]}).families[0].name == "digits_mlp_8"
    text = keys_help(MetaTrainConfig)
    assert "\n  families[].name " in text and "\n  pes.particles=8 " in text and "\n  lm_sampler.shapes=[]" in text


def test_shipped_configs_load():
    for name in ("smoke", "lm"):
        MetaTrainConfig.from_file(Path(__file__).parents[2] / "configs" / "metatrain" / f"{name}.yaml")


def _script():
    import importlib.util

    path = Path(__file__).parents[2] / "scripts" / "metatrain.py"
    spec = importlib.util.spec_from_file_location("metatrain_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_refuses_bad_overrides(capsys):
    config = str(Path(__file__).parents[2] / "configs" / "metatrain" / "smoke.yaml")
    from recipes.train.cli import run_main

    assert run_main(_script().main, ["--config", config, "--metatrain.outer_stepz=3"]) == 1
    err = capsys.readouterr().err
    assert "did you mean 'metatrain.outer_steps'" in err and len(err.strip().splitlines()) == 1
    assert run_main(_script().main, ["--config", config, "stray"]) == 1
