"""scripts/device_check.py on small CPU shapes: every figure the accelerator run records is there."""
import json

from tests.train.test_sample import script


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
    assert memory["recipe"] == "gpt3xl_celo2" and memory["remat"] is True
    assert memory["dry_run_params_and_opt_state_bytes"] > 0 and memory["xla_estimate_bytes"] > 0
    numerics = sections["numerics"]
    assert len(numerics["cpu_losses"]) == len(numerics["device_losses"]) == numerics["steps"]
    assert numerics["within_tolerance"]
    table = (out / "device_check.md").read_text()
    for phrase in ("tokens/s", "MFU", "optimizer share", "Celo2-base/AdamW", "Celo2/Muon", "peak device memory",
                   "largest loss difference"):
        assert phrase in table
    assert "device_check.md" in capsys.readouterr().out
