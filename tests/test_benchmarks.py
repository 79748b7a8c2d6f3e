"""The benchmark entry point runs end to end (tiny model, built-in data) and
writes every section of its Markdown; the numbers themselves are measured
by running it, never asserted."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_writes_every_section(tmp_path):
    md = tmp_path / "B.md"
    try:
        p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--model", "tiny-random",
                            "--synthetic", "--max-eval", "4", "--ratios", "4", "--cost-ratios", "4", "--cost-epochs",
                            "1", "--throughput-n", "4", "--repeats", "1", "--pca-tokens", "4000", "--out",
                            str(tmp_path / "b"), "--md", str(md)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:  # ~1 min here: a hang, not a slow machine
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"run_all.py did not end in 600 s; its stderr ended with: {err[-3000:]}")
    assert p.returncode == 0, p.stderr[-3000:]
    text = md.read_text()
    for head in ("## 1. Quality vs compression", "## 2. Generation throughput", "## 3. Compressor fit",
                 "## 4. Training cost to 95% F1 retention", "## 5. Memory of `latentwire run`"):
        assert head in text, head
    assert "| vocab | 4.0 |" in text and "| linear PCA inverse | 4.0 |" in text and "| seed preset (mlp) | 4.0 |" in text
    assert "ours + the run's prefix prefilled once (default) |" in text and "(**baseline**)" in text
    assert text.count(" | 4/4 |") >= 4  # our loops answer as the baseline does
    assert "built-in synthetic set" in text


def test_sigterm_stops_the_workers_and_their_runs(tmp_path):
    """`kill PID` of the benchmark ends its pool workers and the `latentwire
    run` child of the memory task too (they share its session here)."""
    import os
    import signal
    import time
    p = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--model", "tiny-random",
                          "--synthetic", "--max-eval", "4", "--ratios", "4", "--cost-ratios", "4", "--cost-epochs", "1",
                          "--throughput-n", "4", "--pca-tokens", "4000", "--out", str(tmp_path / "b"),
                          "--md", str(tmp_path / "B.md")], start_new_session=True, cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def session():
        rows = subprocess.run(["ps", "-ww", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout.splitlines()
        return [r for r in rows if r.split()[1] == str(p.pid) and r.split()[0] != str(p.pid)]
    try:
        t0 = time.time()
        while not any("latentwire.cli" in r for r in session()):  # the memory run has started
            assert p.poll() is None and time.time() - t0 < 120
            time.sleep(0.1)
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=60)
        # within 3 s: unstopped, the memory run would go on for several more
        # seconds here (minutes on the real model), and each worker until its task ended
        t0 = time.time()
        while session() and time.time() - t0 < 3:
            time.sleep(0.1)
        assert session() == []
    finally:
        os.killpg(p.pid, signal.SIGKILL) if session() or p.poll() is None else None


def test_wire_grid_smoke(tmp_path):
    """benchmarks/wire_grid.py on the tiny model: a cell, the references, the
    table, the plot; a second call reuses the cell (same settings)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "wire_grid.py"), "--model", "tiny-random", "--max-eval", "6",
           "--cells", "vocab:8:2", "--ac-contexts", "1", "--out", str(tmp_path / "wg")]
    p = run_script(cmd, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| vocab | 8 | 2 |" in p.stdout and "LLM arithmetic coding" in p.stdout
    assert (tmp_path / "wg" / "f1_vs_bytes.png").exists()
    again = run_script(cmd, cwd=tmp_path)
    assert again.returncode == 0 and "[reuse] " in again.stderr


def test_seq_grid_smoke(tmp_path):
    """benchmarks/seq_grid.py on the tiny model: baselines, two learned seeds,
    the paired table (same questions) and the plot."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "seq_grid.py"), "--model", "tiny-random", "--max-eval", "6",
           "--ratios", "2", "4", "--seeds", "0", "1", "--learned-ratios", "2", "--seq-steps", "2",
           "--seq-max-questions", "8",
           "--out", str(tmp_path / "sg"), "--md", str(tmp_path / "SEQ.md")]
    p = run_script(cmd, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| learned_r4 | learned_r4_s1 |" in p.stdout and "| truncate_r2 | baselines |" in p.stdout
    assert "| learned_r2 | learned_r2_s0 |" in p.stdout and "| none | nocontext | 0.0 | 0 |" in p.stdout
    assert "| learned_r4_s0 | none |" in p.stdout
    assert "mean ± sd over 2 seeds | surprisal_r4" in p.stdout
    assert (tmp_path / "sg" / "f1_vs_bytes.png").exists()
    # per learned run: its losses beside the references (text / truncation / no context)
    assert "- learned_r4_s1: 2 QA steps on 8 questions" in p.stdout and "reference CE / KL: text" in p.stdout
    md = (tmp_path / "SEQ.md").read_text()  # the tables with the command that made them, the plot beside
    assert "python benchmarks/seq_grid.py --model tiny-random" in md and "| learned_r4 | learned_r4_s1 |" in md
    assert (tmp_path / "SEQ-f1_vs_bytes.png").exists() and "(SEQ-f1_vs_bytes.png)" in md


def test_pair_grid_smoke(tmp_path):
    """benchmarks/pair_grid.py on the two tiny models: S's own compressor, R's
    own, R reading S's frozen sender; one table with both receivers."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pair_grid.py"), "--model", "tiny-random-b", "--receiver",
           "tiny-random", "--max-eval", "6", "--seq-steps", "2", "--seq-max-questions", "6", "--seq-dim", "4",
           "--out", str(tmp_path / "pg"), "--md", str(tmp_path / "PAIR.md")]
    p = run_script(cmd, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| S tiny-random-b |" in p.stdout and "| R tiny-random |" in p.stdout
    assert "| R reading S (wire_R) | sender_ids |" in p.stdout and "| R (own_R) | learned_r4 |" in p.stdout
    import json
    m = {n: json.loads((tmp_path / "pg" / n / "metrics.json").read_text()) for n in ("own_S", "wire_R")}
    w = [m[n]["pipelines"]["learned_r4"]["wire"]["bytes_mean"] for n in m]
    assert w[0] == w[1]  # one wire: the same payload bytes for both receivers
    assert "python benchmarks/pair_grid.py --model tiny-random-b" in (tmp_path / "PAIR.md").read_text()
    assert "its upper bound, the better of the two answers" in p.stdout
    again = run_script(cmd, cwd=tmp_path)
    assert again.returncode == 0 and again.stderr.count("[reuse]") == 3
    # S's own compressor from an earlier run (--sender-run); cells one at a time (--only), then the table
    run2 = cmd[:cmd.index("--out")] + ["--out", str(tmp_path / "pg2"), "--sender-run", str(tmp_path / "pg" / "own_S"),
                                       "--wire-kinds", "learned"]
    only = run_script(run2 + ["--only", "wire_R"], cwd=tmp_path)
    assert only.returncode == 0 and "[run ]" in only.stderr and not (tmp_path / "pg2" / "own_R").exists()
    table = run_script(run2, cwd=tmp_path)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "wire_R: finished with the same settings" in table.stderr and "| R (own_R) | learned_r4 |" in table.stdout
    # --wire-kinds learned: no surprisal row (truncation and nothing come with the learned wire as its controls)
    assert "| R reading S (wire_R) | surprisal_r4 |" not in table.stdout
    assert "| R reading S (wire_R) | truncate_r4 |" in table.stdout
    wrong = run_script(run2[:-4] + ["--sender-run", str(tmp_path / "pg" / "own_R")], cwd=tmp_path)
    assert wrong.returncode != 0 and "--sender-run" in wrong.stderr and "not of --model tiny-random-b" in wrong.stderr


def test_seq_probe_smoke(tmp_path):
    """benchmarks/seq_probe.py on a tiny learned run: the trained state's loss on
    training and dev questions beside the references."""
    from conftest import tiny_learned_config
    from latentwire.evaluation.run import run_experiment
    run_experiment(tiny_learned_config(tmp_path / "run", "learned"), use_cache=False, log=lambda *a: None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "seq_probe.py"), str(tmp_path / "run"), "--n", "4"]
    p = run_script(cmd, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| training |" in p.stdout and "| dev |" in p.stdout and "none" in p.stdout
    assert "another paragraph" in p.stdout
    bad = run_script([sys.executable, str(ROOT / "benchmarks" / "seq_probe.py"), str(tmp_path)], cwd=tmp_path)
    assert bad.returncode != 0 and "not a learned run" in bad.stderr


def test_pair_grid_oracle_pick_is_the_per_question_better_answer(tmp_path):
    """The joint-rescoring upper bound: per question the better of S's and R's F1, averaged; different
    questions are refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pytest
    from pair_grid import oracle_pick
    from latentwire.util.runio import write_jsonl
    for d, f1s in (("a", [1.0, 0.0, 0.5]), ("b", [0.0, 0.0, 1.0])):
        (tmp_path / d).mkdir()
        write_jsonl(tmp_path / d / "predictions_learned_r4.jsonl", [{"id": str(i), "f1": f} for i, f in enumerate(f1s)])
    s, r, best = oracle_pick(str(tmp_path / "a"), str(tmp_path / "b"), "learned_r4")
    assert (round(s, 4), round(r, 4), round(best, 4)) == (50.0, 33.3333, 66.6667)
    write_jsonl(tmp_path / "b" / "predictions_learned_r4.jsonl", [{"id": "x", "f1": 0.0}] * 3)
    with pytest.raises(SystemExit):
        oracle_pick(str(tmp_path / "a"), str(tmp_path / "b"), "learned_r4")


def test_seq_probe_other_paragraph_gives_each_question_another_contexts_latents():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pytest
    from seq_probe import other_paragraph
    items = [{"ctx": c, "h": h, "qid": i} for i, (c, h) in enumerate([([1], "A"), ([1], "A"), ([2], "B"), ([3], "C")])]
    out = other_paragraph(items)
    assert [o["h"] for o in out] == ["B", "B", "C", "A"] and [o["qid"] for o in out] == [0, 1, 2, 3]
    assert items[0]["h"] == "A"  # the input is not modified
    with pytest.raises(SystemExit):
        other_paragraph(items[:2])


def _squad_files(tmp_path):
    """The built-in synthetic set written as two SQuAD v1.1 files (train / eval articles apart)."""
    import json

    from conftest import squad_json
    from latentwire.data import synthetic_squad
    data = squad_json(synthetic_squad(12, seed=3))["data"]
    paths = []
    for name, part in (("train.json", data[:6]), ("dev.json", data[6:])):
        (tmp_path / name).write_text(json.dumps({"version": "1.1", "data": part}))
        paths.append(str(tmp_path / name))
    return paths


def test_ceiling_smoke(tmp_path):
    """benchmarks/ceiling.py on the tiny model: a copy and a use kind, their controls and the squeeze, written
    between the docs page's markers with the command (the prose around them kept)."""
    tr, ev = _squad_files(tmp_path)
    md = tmp_path / "CEIL.md"
    md.write_text("# prose kept\n\n<!-- ceiling.py: begin -->\nSTALE-TABLE\n<!-- ceiling.py: end -->\n\nafter\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ceiling.py"), "--model", "tiny-random", "--squad-train", tr,
           "--squad-eval", ev, "--contexts", "2", "--kinds", "opt-emb-copy", "opt-kv-use", "--wire-bits", "16,4",
           "--opt-steps", "2", "--opt-copy-steps", "2", "--opt-questions", "2", "--opt-continue", "2",
           "--out", str(tmp_path / "c"), "--md", str(md), "--no-progress"]
    p = run_script(cmd, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    for row in ("| opt-emb-copy_r4 |", "| opt-emb-copy_r4:other |", "| opt-kv-use_r4 |", "| opt-kv-use_r4:other |",
                "| truncate_r4 |", "| none |", "| opt-kv-use_r4_b4 | 4 |"):
        assert row in p.stdout, row
    text = md.read_text()
    assert text.startswith("# prose kept") and text.rstrip().endswith("after") and "STALE-TABLE" not in text
    assert "python benchmarks/ceiling.py --model tiny-random" in text and "| opt-kv-use_r4 |" in text

    # another kind in its own process and folder, then one table from both (--merge runs nothing)
    c2 = cmd[:cmd.index("--kinds")] + ["--kinds", "opt-kv-copy", "--wire-bits", "16", "--opt-copy-steps", "2",
                                       "--out", str(tmp_path / "c2"), "--no-progress"]
    p = run_script(c2, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    merge = [sys.executable, str(ROOT / "benchmarks" / "ceiling.py"), "--merge", str(tmp_path / "c"),
             str(tmp_path / "c2"), "--md", str(md)]
    p = run_script(merge, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    for row in ("| opt-emb-copy_r4 |", "| opt-kv-use_r4 |", "| opt-kv-copy_r4 |", "| opt-kv-copy_r4:other |",
                "| opt-kv-use_r4_b4 | 4 |"):
        assert row in p.stdout, row
    assert p.stdout.count("| truncate_r4 |") == 2  # the ceiling table and the where-the-answer-lies table
    split = p.stdout.split("Where the answer lies")[1]
    assert "| opt-kv-copy_r4 |" in split and "| opt-emb-copy_r4 |" in split and "_b4" not in split
    text = md.read_text()
    assert f"--kinds opt-kv-copy --wire-bits 16 --opt-copy-steps 2 --out {tmp_path / 'c2'}" in text  # its command
    # a folder whose reference answers differ is refused, in one line naming it
    shutil.copytree(tmp_path / "c2", tmp_path / "c3")
    rows = (tmp_path / "c3" / "predictions_truncate_r4.jsonl").read_text().splitlines()
    first = json.loads(rows[0]) | {"prediction": "something else"}
    (tmp_path / "c3" / "predictions_truncate_r4.jsonl").write_text("\n".join([json.dumps(first)] + rows[1:]) + "\n")
    p = run_script(merge[:-3] + [str(tmp_path / "c3")], cwd=tmp_path)
    assert p.returncode == 2 and "--merge" in p.stderr and "truncate_r4 answers differ" in p.stderr, p.stderr


def test_ceiling_jobs_split_run_and_merge(tmp_path):
    """--jobs 2: the kinds split by cost into two processes (one run folder each under --out), then one merged
    table; the written section names each job's command."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ceiling import kind_groups
    assert kind_groups(["opt-emb-copy", "opt-emb-use", "opt-kv-copy", "opt-kv-use"], 2) == \
        [["opt-emb-use", "opt-emb-copy"], ["opt-kv-use", "opt-kv-copy"]]
    assert kind_groups(["opt-kv-use", "opt-emb-copy", "opt-kv-copy"], 2) == \
        [["opt-kv-use"], ["opt-emb-copy", "opt-kv-copy"]]
    tr, ev = _squad_files(tmp_path)
    md = tmp_path / "J.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ceiling.py"), "--model", "tiny-random", "--squad-train", tr,
           "--squad-eval", ev, "--contexts", "2", "--kinds", "opt-emb-copy", "opt-kv-copy", "--wire-bits", "16",
           "--opt-copy-steps", "2", "--jobs", "2", "--out", str(tmp_path / "j"), "--md", str(md), "--no-progress"]
    p = run_script(cmd, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    for k in ("opt-emb-copy", "opt-kv-copy"):
        assert (tmp_path / "j" / k / "metrics.json").is_file() and (tmp_path / "j" / f"{k}.log").is_file()
        assert f"| {k}_r4 |" in p.stdout and f"| {k}_r4:other |" in p.stdout
    text = md.read_text()
    assert f"--kinds opt-kv-copy --wire-bits 16 --opt-copy-steps 2 --out {tmp_path / 'j' / 'opt-kv-copy'}" in text
    assert "--jobs 2" in text and "run 2 at a time" in text


def test_layer_probe_smoke(tmp_path):
    """benchmarks/layer_probe.py on the tiny model: one row per layer, token recovery in percent."""
    tr, ev = _squad_files(tmp_path)
    p = run_script([sys.executable, str(ROOT / "benchmarks" / "layer_probe.py"), "--model", "tiny-random",
                    "--squad-train", tr, "--squad-eval", ev, "--train-paragraphs", "6", "--eval-paragraphs", "3",
                    "--md", str(tmp_path / "L.md")], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "<!-- layer_probe.py: begin -->" in (tmp_path / "L.md").read_text()
    assert p.stdout.count("\n| ") >= 3, p.stdout  # a header, and layers 0.. of the 2-layer model
