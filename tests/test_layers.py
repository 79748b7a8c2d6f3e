"""The package's imports go only downward: the layers contract in pyproject.toml ([tool.importlinter]), checked
by import-linter's `lint-imports` -- a lower layer importing a higher one fails this test."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_follow_the_layers_contract():
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = [str(exe) if exe.exists() else shutil.which("lint-imports"), "--no-cache"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout
