"""The README's follow-up commands, run as written on a trained run: sample, then export and load
the export with transformers' AutoTokenizer and text-generation pipeline, offline."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")


def readme_command(script: str) -> list[str]:
    """The README's command line that runs ``script``, split as bash would (with $'..' quoting)."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith(".venv/bin/python ") and f"scripts/{script}" in line]
    assert lines, f"the README shows no command for scripts/{script}"
    words = subprocess.run(["bash", "-c", "eval \"set -- $0\"; for a in \"$@\"; do printf '%s\\0' \"$a\"; done",
                            lines[0].split("#")[0]], capture_output=True, check=True).stdout.split(b"\0")[:-1]
    return [w.decode() for w in words]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("first") / "run"
    train.main(["--model.size=tiny", "--data.seq_len=32", "--data.global_batch=8", "--optimizer.name=adamw",
                "--train.steps=3", "--eval.batches=1", "--logging.progress=false", "--mesh.devices=1",
                f"--train.out_dir={run_dir}"])
    return run_dir


def run_as_readme(script: str, run_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    words = readme_command(script)
    assert words[0] == ".venv/bin/python"
    words = [sys.executable] + [str(run_dir) if w == "runs/shakespeare_celo2" else w for w in words[1:]]
    words = [str(tmp_path / "hf_model") if w == "hf_model" else w for w in words]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_sample_command_prints_the_prompt_and_continues_it(trained_run, tmp_path):
    result = run_as_readme("sample.py", trained_run, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("**ROMEO**\n") and len(result.stdout) > len("**ROMEO**\n") + 20
    assert "WARNING" not in result.stderr, result.stderr


def test_export_command_writes_a_directory_transformers_loads_offline(trained_run, tmp_path, monkeypatch):
    result = run_as_readme("export_hf.py", trained_run, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WARNING" not in result.stderr, result.stderr
    out = tmp_path / "hf_model"
    for name in ("model.safetensors", "config.json", "generation_config.json", "vocab.json", "merges.txt",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    from data.tokenizer import gpt2_encoding

    text = "**ROMEO**\nBut, soft! what light through yonder window breaks?"
    assert tokenizer(text)["input_ids"] == gpt2_encoding().encode(text)
    generator = transformers.pipeline("text-generation", model=str(out))
    generated = generator("**ROMEO**\n", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert generated.startswith("**ROMEO**\n") and len(generated) > len("**ROMEO**\n")


def test_push_without_network_is_one_error_line_and_keeps_the_export(trained_run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "scripts/export_hf.py", "--checkpoint", str(trained_run), "--out",
                             str(tmp_path / "m"), "--push-to-hub", "someone/model"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: could not push"), result.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
