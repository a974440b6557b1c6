"""Every script runs as `python scripts/NAME.py` from any directory and as `python -m scripts.NAME`,
with no sys.path edits: the packages come from the installation."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if p.name != "__init__.py")


# Their JAX compilation cache defaults to the user's cache directory, never ./cache/jax where they run.
CACHING = ("eval_optimizer.py", "metatrain.py", "plot_metatrain.py", "ship_theta.py")


def test_every_script_answers_help_from_another_directory_and_as_a_module(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    runs = {f"{path.name} from {tmp_path}": subprocess.Popen([sys.executable, str(path), "--help"], cwd=tmp_path,
                                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                            env=env)
            for path in SCRIPTS}
    runs["-m scripts.sweep"] = subprocess.Popen([sys.executable, "-m", "scripts.sweep", "--help"], cwd=ROOT,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert len(SCRIPTS) >= 12
    for what, process in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{what}: {output[-2000:]}"
        assert "usage:" in output, what
        if what.split()[0] in CACHING:
            unwrapped = "".join(output.split())  # argparse wraps long paths anywhere
            assert f"default:{tmp_path / 'xdg' / 'celo2-gpt' / 'jax'})" in unwrapped, output
    assert not any("sys.path" in p.read_text() for p in SCRIPTS)
