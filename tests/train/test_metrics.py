import json
from pathlib import Path

from recipes.train.metrics import MetricsLog


def test_resume_keeps_rows_through_the_checkpoint_and_drops_a_line_cut_short(tmp_path: Path):
    """A run killed mid-write leaves rows past its checkpoint and a partial last line: the resumed
    log keeps only the rows up to the checkpoint's step, and hands them to the caller."""
    rows = [{"step": s, "loss": 5.0 - s, "wall_time_s": 1.5 * s} for s in (2, 4, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    log = MetricsLog(tmp_path, wandb_mode="disabled", project="p", name="n", config={}, resume_step=4)
    assert log.records == rows[:2]
    log.log({"step": 5, "loss": 0.5})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 5]


def test_fresh_run_directory_has_no_rows(tmp_path: Path):
    log = MetricsLog(tmp_path, wandb_mode="disabled", project="p", name="n", config={}, resume_step=0)
    assert log.records == []
    log.close()
