"""Every script runs as `python scripts/NAME.py` from any directory and as `python -m scripts.NAME`,
with no sys.path edits: the packages come from the installation."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if p.name != "__init__.py")


def test_every_script_answers_help_from_another_directory_and_as_a_module(tmp_path):
    runs = {f"{path.name} from {tmp_path}": subprocess.Popen([sys.executable, str(path), "--help"], cwd=tmp_path,
                                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for path in SCRIPTS}
    runs["-m scripts.sweep"] = subprocess.Popen([sys.executable, "-m", "scripts.sweep", "--help"], cwd=ROOT,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert len(SCRIPTS) >= 12
    for what, process in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{what}: {output[-2000:]}"
        assert "usage:" in output, what
    assert not any("sys.path" in p.read_text() for p in SCRIPTS)
