"""scripts/bench_train.py reports tokens/s and the step-time breakdown."""
import pytest

from tests.helpers import TINY, script


@pytest.mark.slow
def test_bench_train_reports_breakdown(capsys):
    report = script("bench_train").main([*TINY, "--steps", "1", "--synthetic"])
    assert set(report["seconds"]) == {"data", "fwd_bwd", "optimizer", "step"}
    assert all(t > 0 for t in report["seconds"].values())
    assert report["tokens_per_step"] == 8 * 32 and report["micro_batches_per_step"] == 1
    assert report["tokens_per_s"] > 0 and report["mfu"] is None
    assert "tokens/s" in capsys.readouterr().out
