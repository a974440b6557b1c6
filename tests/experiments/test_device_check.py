"""scripts/device_check.py on small CPU shapes: every figure the accelerator run records is there."""
import json
import os
import tempfile
import uuid

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import script


@pytest.mark.slow
def test_device_check_names_every_figure(tmp_path, capsys):
    out = tmp_path / "check"
    report = script("device_check").main(["--tiny", "--out", str(out), "--compilation-cache", ""])
    saved = json.loads((out / "device_check.json").read_text())
    assert saved == json.loads(json.dumps(report, default=float))
    sections = saved["sections"]
    assert not [name for name, s in sections.items() if "error" in s]
    training = sections["training"]["optimizers"]
    assert set(training) == {"adamw", "muon", "celo2"}
    for row in training.values():
        assert row["tokens_per_s"] > 0 and row["compute_dtype"] == "bfloat16"
        assert {"fwd_bwd", "optimizer", "step"} <= set(row["seconds"])
        assert 0 < row["optimizer_share_of_0.5M_token_step"] < 1 and "mfu" in row
    (updates,) = [w for w in sections["updates"].values() if isinstance(w, dict)]
    assert set(updates["results"]) == {"adamw", "muon", "celo2_base", "celo2"}
    assert set(updates["ratios"]) == {"celo2_base/adamw", "celo2/muon"}
    memory = sections["memory"]
    assert memory["recipe"] == "gpt3xl_celo2" and memory["remat"] == "full"
    assert memory["dry_run_params_and_opt_state_bytes"] > 0 and memory["xla_estimate_bytes"] > 0
    numerics = sections["numerics"]
    assert len(numerics["cpu_losses"]) == len(numerics["device_losses"]) == numerics["steps"]
    assert numerics["within_tolerance"]
    table = (out / "device_check.md").read_text()
    for phrase in ("tokens/s", "MFU", "optimizer share", "Celo2-base/AdamW", "Celo2/Muon", "peak device memory",
                   "largest loss difference"):
        assert phrase in table
    assert "device_check.md" in capsys.readouterr().out


def test_target_description_is_saved_first_and_named_in_the_report(tmp_path, monkeypatch):
    """On a CPU the step is skipped (a program is still compiled with dumping on, and its dump removed);
    with a GPU's description (faked here) the file is written and named before any section runs."""
    from recipes.experiments import device_check

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    platform, text = device_check.target_description()
    assert platform == "cpu" and text is None
    assert not list(scratch.iterdir())
    monkeypatch.undo()
    skipped = device_check.run(tmp_path / "cpu", tiny=True, sections=())
    assert skipped["gpu_target_config"] == {"skipped": "cpu backend"}
    assert not (tmp_path / "cpu" / device_check.TARGET_CONFIG_FILE).exists()

    fake = 'gpu_device_info {\n  cuda_compute_capability {\n    major: 9\n    minor: 0\n  }\n}\n' \
           'device_description_str: "NVIDIA H200"\n'
    monkeypatch.setattr(device_check, "target_description", lambda: ("cuda", fake))
    seen = {}
    monkeypatch.setattr(device_check, "compile_for_target",
                        lambda text, platform: seen.setdefault("read_back", (text, platform)) and
                        {"devices": 1, "device_kind": "H200"})

    def first_section(sizes):  # the file and the report naming it exist before any section runs
        seen["at_first_section"] = json.loads((tmp_path / "gpu" / "device_check.json").read_text())
        return {}

    monkeypatch.setitem(device_check.SECTIONS, "first", first_section)
    report = device_check.run(tmp_path / "gpu", tiny=True, sections=("first",))
    assert (tmp_path / "gpu" / "gpu_target_config.txtpb").read_text() == fake
    assert seen["read_back"] == (fake, "cuda")
    target = report["gpu_target_config"]
    assert target["file"] == "gpu_target_config.txtpb" and target["bytes"] == len(fake)
    assert target["device_description"] == "NVIDIA H200" and target["compute_capability"] == "9.0"
    assert seen["at_first_section"]["gpu_target_config"]["file"] == "gpu_target_config.txtpb"
    assert target["compile_check"]["device_kind"] == "H200"
    assert json.loads((tmp_path / "gpu" / "device_check.json").read_text())["gpu_target_config"] == target
    assert "saved as `gpu_target_config.txtpb`" in (tmp_path / "gpu" / "device_check.md").read_text()


def test_a_failed_target_description_is_recorded_and_not_read_back(tmp_path, monkeypatch):
    from recipes.experiments import device_check

    def fails():
        raise RuntimeError("XLA's GPU compiler wrote no *.gpu_target_config.pbtxt into its dump directory")

    monkeypatch.setattr(device_check, "target_description", fails)
    monkeypatch.setattr(device_check, "compile_for_target", lambda text, platform: pytest.fail("read back"))
    report = device_check.run(tmp_path, tiny=True, sections=())
    assert report["gpu_target_config"]["error"].startswith("RuntimeError: XLA's GPU compiler wrote no")
    assert not (tmp_path / device_check.TARGET_CONFIG_FILE).exists()
    assert "**GPU target description** failed" in (tmp_path / "device_check.md").read_text()


def _uniquely_named_program():
    """A lowered program of a module name never compiled before: one loaded from the persistent
    compilation cache (whose key leaves dump options out) is not compiled, so dumps nothing."""
    name = f"dump_probe_{uuid.uuid4().hex}"

    def probe(x):
        return x * 2

    probe.__name__ = probe.__qualname__ = name
    return name, jax.jit(probe).lower(jnp.zeros(8))


def test_per_compile_dump_options_reach_xla(tmp_path):
    """What target_description relies on: a dump directory given to one compile through jax's public API,
    and a module filter that keeps every other module out of it."""
    name, program = _uniquely_named_program()
    program.compile(compiler_options={"xla_dump_to": str(tmp_path / "all")})
    assert any(name in f for f in os.listdir(tmp_path / "all"))
    _, program = _uniquely_named_program()
    program.compile(compiler_options={"xla_dump_to": str(tmp_path / "none"), "xla_dump_hlo_module_re": "no_such"})
    assert not (tmp_path / "none").exists() or not os.listdir(tmp_path / "none")


def test_target_description_of_a_compile_only_gpu_is_the_one_it_was_built_from():
    """XLA's GPU compiler dumps its target description with no GPU present, for a compile-only device
    built from the shipped H100 description: the same description comes back, and compiles again."""
    from jax.experimental import topologies

    from recipes.experiments import device_check
    from recipes.experiments.gpu_slices import cuda_missing, target_description

    if missing := cuda_missing():
        pytest.skip(missing)
    shipped = target_description("h100")
    try:
        (device,) = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=shipped).devices
    except (NotImplementedError, RuntimeError) as error:  # the CUDA plugin did not initialise here
        pytest.skip(f"no compile-only CUDA topology: {error}")
    platform, text = device_check.target_description(device)
    assert platform == "cuda"
    assert set(shipped.splitlines()) <= set(text.splitlines())  # the dump may add empty fields
    assert device_check.compile_for_target(text, platform)["device_kind"] == device.device_kind
