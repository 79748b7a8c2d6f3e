"""The benchmark entry point runs end to end (tiny model, built-in data) and
writes every section of its Markdown; the numbers themselves are measured
by running it, never asserted."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_writes_every_section(tmp_path):
    md = tmp_path / "B.md"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--model", "tiny-random",
                        "--synthetic", "--max-eval", "4", "--ratios", "4", "--cost-ratios", "4", "--cost-epochs", "1",
                        "--throughput-n", "4", "--pca-tokens", "4000", "--out", str(tmp_path / "b"), "--md", str(md)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    text = md.read_text()
    for head in ("## 1. Quality vs compression", "## 2. Generation throughput", "## 3. Compressor fit",
                 "## 4. Training cost to 95% F1 retention", "## 5. Memory of `latentwire run`"):
        assert head in text, head
    assert "| vocab | 4.0 |" in text and "| linear PCA inverse | 4.0 |" in text and "| seed preset (mlp) | 4.0 |" in text
    assert "shared-prefix prefill (default) |" in text
    assert text.count(" | 4/4 |") == 2  # both batched loops answer as the seed loop does
    assert "built-in synthetic set" in text
