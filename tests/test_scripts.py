"""Every script runs as `python scripts/NAME.py` from any directory and as `python -m scripts.NAME`,
with no sys.path edits: the packages come from the installation."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_a_machine_without_accelerators_runs_quietly_on_its_cpu_with_the_plugins_installed(tmp_path):
    """The [cuda] and [tpu] extras are installed here (the test extra has both) and no GPU or TPU is:
    no plugin's probe may print before the first line, and the CPU is the backend."""
    from recipes.platforms import accelerators_present

    if accelerators_present():
        pytest.skip("this machine has an accelerator")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import recipes, jax, os; print(jax.default_backend(), os.environ['JAX_PLATFORMS'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["cpu", "cpu"]
    assert "cuPTI" not in done.stderr and "Traceback" not in done.stderr and "TPU" not in done.stderr, done.stderr
    # An explicit choice is left alone.
    done = subprocess.run([sys.executable, "-c", "import recipes, os; print(os.environ['JAX_PLATFORMS'])"],
                          capture_output=True, text=True, env={**env, "JAX_PLATFORMS": "cpu,tpu"}, timeout=120)
    assert done.stdout.split() == ["cpu,tpu"]
