"""scripts/device_check.py on small CPU shapes: every figure the accelerator run records is there."""
import json

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
    """On a CPU the step is skipped (the CPU's topology is still read, so the API it relies on exists);
    with a GPU's description (faked here) the file is written and named before any section runs."""
    from recipes.experiments import device_check

    platform, text = device_check.target_description()
    assert platform == "cpu" and text is None
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


def test_target_description_has_a_second_way_after_the_sections(tmp_path, monkeypatch):
    from recipes.experiments import device_check

    def missing():
        raise AttributeError("Unknown attribute target_config")

    monkeypatch.setattr(device_check, "target_description", missing)
    monkeypatch.setattr(device_check, "runtime_target_description", lambda: ("cuda", 'device_description_str: "X"\n'))
    monkeypatch.setattr(device_check, "compile_for_target", lambda text, platform: {"devices": 1, "device_kind": "X"})
    report = device_check.run(tmp_path, tiny=True, sections=())
    target = report["gpu_target_config"]
    assert target["file"] == "gpu_target_config.txtpb" and "error" not in target
    assert target["first_try_error"] == "AttributeError: Unknown attribute target_config"
    assert (tmp_path / "gpu_target_config.txtpb").read_text() == 'device_description_str: "X"\n'

    monkeypatch.setattr(device_check, "runtime_target_description", missing)
    failed = device_check.run(tmp_path / "both", tiny=True, sections=())["gpu_target_config"]
    assert failed["error"] == failed["second_try_error"] == "AttributeError: Unknown attribute target_config"
    assert "**GPU target description** failed" in (tmp_path / "both" / "device_check.md").read_text()
