"""Payloads that travel: the frame of a payload file (latentwire/pipelines/frame.py), the integrity check of LLM-coded
payloads (wire.LMArithmeticCodec), and a codec model other than the receiver (--codec-model)."""
import copy
import re
from pathlib import Path

import pytest
import torch

import latentwire as lw
from latentwire.pipelines import frame
from latentwire.errors import LatentWireError
from latentwire.llm.models import load_model
from latentwire.pipelines import KINDS
from latentwire.wire.wire import IntegrityError, Payload

ROOT = Path(__file__).resolve().parents[1]
PARA = ROOT / "examples" / "paragraph.txt"
TEXT = " ".join(PARA.read_text().split())
SHORT = TEXT[:200]
Q = "Who designed the tower?"
CHEAP = [k for k in KINDS if not KINDS[k].trained and not k.startswith("opt-")]  # opt-*: a fit per paragraph


@pytest.fixture(scope="module")
def tiny_b():
    return load_model("tiny-random-b")


def cli(*args):
    from conftest import run_cli
    return run_cli(*args, cwd=ROOT)


def one_line_error(r, *parts):
    assert r.returncode == 2 and r.stderr.startswith("latentwire: error:") and r.stderr.count("\n") == 1, r.stderr
    for p in parts:
        assert p in r.stderr, r.stderr


def test_kind_labels_are_the_built_pipelines_names(tiny):
    """The frame names a pipeline by its label; the table that names a frame's tag in errors is right."""
    for kind in KINDS:
        if KINDS[kind].trained:
            assert frame.kind_label(kind, 4) is None
            continue
        for r in (1, 2.5, 4):
            assert lw.load_pipeline(kind, lm=tiny, ratio=r).name == frame.kind_label(kind, r)
    assert "truncate_r4+ac" in frame.known_labels() and "learned_r4" in frame.known_labels()


@pytest.mark.parametrize("kind", CHEAP)
def test_every_kind_round_trips_in_its_frame_and_refuses_others(tiny, tiny_b, kind):
    """Every kind: the framed file reads back to the payload (8 bytes more); another kind, ratio or receiver
    model reading it gets one error naming both sides; a corrupted byte fails the checksum."""
    pipe = lw.load_pipeline(kind, lm=tiny, ratio=4)
    pl = pipe.send(SHORT)
    data = lw.wrap(pipe, pl)
    assert len(data) == len(pl) + frame.FRAME_BYTES and data[:2] == b"LW"
    assert lw.unwrap(pipe, data) == pl
    other = "truncate" if kind != "truncate" else "surprisal"
    with pytest.raises(LatentWireError, match=rf"made by {re.escape(frame.kind_label(kind, 4))}.*not by "
                                              rf"{re.escape(frame.kind_label(other, 4))}"):
        lw.unwrap(lw.load_pipeline(other, lm=tiny, ratio=4), data)
    if KINDS[kind].ratio:
        with pytest.raises(LatentWireError, match=rf"made by {re.escape(frame.kind_label(kind, 4))}.* not by .*_r2"):
            lw.unwrap(lw.load_pipeline(kind, lm=tiny, ratio=2), data)
    if pipe.identity()["receiver"] or pipe.identity()["codec"]:  # text depends on no model
        with pytest.raises(LatentWireError, match="made for another receiver model|another codec model"):
            lw.unwrap(lw.load_pipeline(kind, lm=tiny_b, ratio=4), data)
    else:
        assert lw.unwrap(lw.load_pipeline(kind, lm=tiny_b, ratio=4), data) == pl
    for i in (0, 3, 7, len(data) - 1):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(LatentWireError, match="not a latentwire payload|frame version|corrupted|made by"):
            lw.unwrap(pipe, bytes(bad))


def test_trained_weights_are_part_of_the_fingerprint(tiny):
    pipe = lw.load_pipeline("meanpool", lm=tiny)
    pipe.weights_digest = "a" * 32
    data = lw.wrap(pipe, pipe.send(SHORT))
    pipe.weights_digest = "b" * 32
    with pytest.raises(LatentWireError, match="another codec model or trained weights.*trained weights bbbb"):
        lw.unwrap(pipe, data)


def test_cli_refuses_another_pipeline_ratio_model_or_a_raw_file(tiny, tmp_path):
    """`ask` with another pipeline or ratio than `send` used: one line naming both, before any model loads (the
    model named is not even loadable); another model: one line after it loads; a file with no frame."""
    out = tmp_path / "t.bin"
    assert cli("send", "--pipeline", "truncate", "--model", "tiny-random", str(PARA), "-o", str(out)).returncode == 0
    one_line_error(cli("ask", "--pipeline", "ac", "--model", "/no/such/model", str(out), Q),
                   f"payload {out}: made by truncate_r4", "not by ac")
    one_line_error(cli("ask", "--pipeline", "truncate", "--ratio", "2", "--model", "/no/such/model", str(out), Q),
                   "made by truncate_r4", "not by truncate_r2")
    one_line_error(cli("ask", "--pipeline", "truncate", "--model", "tiny-random-b", str(out), Q),
                   "another receiver model", "tiny-random-b")
    raw = tmp_path / "raw.bin"
    raw.write_bytes(lw.load_pipeline("truncate", lm=tiny).send(TEXT))
    one_line_error(cli("ask", "--pipeline", "truncate", "--model", "/no/such/model", str(raw), Q),
                   "not a latentwire payload file")
    bad = bytearray(out.read_bytes())
    bad[12] ^= 1
    raw.write_bytes(bytes(bad))
    one_line_error(cli("ask", "--pipeline", "truncate", "--model", "/no/such/model", str(raw), Q), "corrupted")


def test_codec_model_feeds_another_receiver_its_text_answers(tiny, tiny_b, tmp_path):
    """The issue's command on two different tiny models: `ac` coded by A, read by B, answers as B reading the
    text does; the payload names its codec (read with another: refused), not its receiver."""
    out = tmp_path / "p.bin"
    r = cli("send", "--pipeline", "ac", "--codec-model", "tiny-random", "--model", "tiny-random", str(PARA),
            "-o", str(out))
    assert r.returncode == 0, r.stderr
    r = cli("ask", "--pipeline", "ac", "--codec-model", "tiny-random", "--model", "tiny-random-b", str(out), Q,
            "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    text_b = lw.load_pipeline("text", lm=tiny_b)
    assert r.stdout.rstrip("\n") == lw.ask(text_b, text_b.send(TEXT), Q, max_new_tokens=6)
    one_line_error(cli("ask", "--pipeline", "ac", "--model", "tiny-random-b", str(out), Q),
                   "another codec model", "tiny-random-b")
    # the API: B reads what A coded, as its own tokens of the text; positions counted on B
    pipe = lw.load_pipeline("ac", lm=tiny_b, codec_model=tiny)
    pl = pipe.send(TEXT)
    assert lw.unwrap(pipe, out.read_bytes()) == pl
    assert pipe.receive(pl).tolist() == text_b.receive(text_b.send(TEXT)).tolist()
    assert pl.positions == len(text_b.receive(text_b.send(TEXT)))
    assert bytes(pl) == bytes(lw.load_pipeline("ac", lm=tiny).send(TEXT))  # A's own code of the text


@pytest.mark.parametrize("kind", ["truncate+ac", "surprisal+ac"])
def test_codec_model_codes_the_kept_tokens(tiny, tiny_b, kind):
    """With a codec model the kept tokens are the codec's (M = ceil(L_codec / r)); B reads their text."""
    from latentwire.data import context_token_ids
    from latentwire.pipelines.cross import ids_to_text
    pipe = lw.load_pipeline(kind, lm=tiny_b, ratio=2, codec_model=tiny)
    on_a = lw.load_pipeline(kind, lm=tiny, ratio=2)
    pl = pipe.send(SHORT)
    assert bytes(pl) == bytes(on_a.send(SHORT))
    want = context_token_ids(tiny_b.tokenizer, ids_to_text(tiny.tokenizer, on_a.receive(on_a.send(SHORT)).tolist()))
    assert pipe.receive(pl).tolist() == want and pl.positions == len(want)


def test_integrity_check_refuses_a_corrupted_payload(tiny):
    """A flipped bit in an LLM-coded payload (no frame to catch it) fails the check: never other text."""
    pipe = lw.load_pipeline("ac", lm=tiny)
    pl = pipe.send(SHORT)
    for i in (0, 1, 3, 4, len(pl) // 2):
        bad = bytearray(pl)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError, match="decoded to other tokens|not an LLM-coded payload"):
            pipe.codec.decode(bytes(bad))
    with pytest.raises(IntegrityError):
        lw.ask(pipe, Payload(bytes(pl[:-1])), Q)  # not a whole number of words
    assert lw.ask(pipe, pl, Q, max_new_tokens=2)  # the intact payload still answers


def perturbed(lm):
    """The model with one weight changed in its last bit (a model file that differs by one ulp): the final norm's
    first weight, which every logit goes through. (One ulp of a rare token's embedding row may change no
    decoded token: the coder's probabilities are rounded to its fixed-point grid; then the answer is right.)"""
    other = copy.copy(lm)
    other.model = copy.deepcopy(lm.model)
    with torch.no_grad():
        flat = other.model.model.norm.weight.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    return other


def test_integrity_check_refuses_a_perturbed_codec_model(tiny):
    """Decoding with one weight changed in its last bit: the frame's fingerprint refuses it (the tiny model's
    digest hashes its parameters), and without the frame the integrity check does."""
    pipe = lw.load_pipeline("ac", lm=tiny)
    pl = pipe.send(TEXT)
    other = lw.load_pipeline("ac", lm=perturbed(tiny))
    with pytest.raises(LatentWireError, match="another codec model"):
        lw.ask(other, lw.wrap(pipe, pl), Q)
    with pytest.raises(IntegrityError, match="codec model's numbers differ"):
        lw.ask(other, pl, Q)


def test_evaluation_raises_on_a_payload_decoded_with_other_numbers(tiny, tmp_path):
    """The evaluation path: a receiver whose codec computes other numbers stops the run with the integrity
    error; it never scores an answer from other text."""
    pipe = lw.load_pipeline("ac", lm=tiny)
    pipe.encode_many = lambda items, codec=lw.load_pipeline("ac", lm=perturbed(tiny)).codec: [
        Payload(d, len(ids)) for d, (_, ids) in zip(codec.encode_many(items), items)]
    with pytest.raises(IntegrityError):
        lw.evaluate([pipe], max_eval=2, out=tmp_path / "ev", log=lambda *a: None)


def test_run_with_a_codec_model_reads_ac_as_the_receivers_text(tmp_path):
    """`latentwire run --model B --codec-model A`: `ac` coded by A, read by B, gives B's text answers question
    by question (agreement 100%); the run names its codec model."""
    import json
    out = tmp_path / "run"
    r = cli("run", "--model", "tiny-random-b", "--codec-model", "tiny-random", "--no-stage1", "--sequence", "none",
            "--pipeline", "ac", "--synthetic-articles", "6", "--max-eval", "6", "--max-new-tokens", "4",
            "--n-boot", "20", "--ac-contexts", "0", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["pipelines"]["ac"]["agreement"] == 1.0 and m["codec_model"]["model"] == "tiny-random"
    assert m["pipelines"]["ac"]["wire"]["positions_mean"] == m["pipelines"]["text"]["wire"]["positions_mean"]


def test_sender_model_runs_take_the_llm_coded_kinds_with_a_codec_model():
    from latentwire.config import RunConfig
    c = RunConfig()
    c.model.model, c.model.sender_model, c.eval.stage1, c.eval.pipeline = "tiny-random-b", "tiny-random", False, "ac"
    with pytest.raises(LatentWireError, match="--sender-model with ac.*with a --codec-model"):
        c.validate()
    c.model.codec_model = "tiny-random"
    c.validate()


def test_wire_robustness_benchmark_counts_what_the_check_catches(tmp_path):
    """benchmarks/wire_robustness.py on the tiny model: the same settings decode exactly, 1 lane against 8 does
    not and the check catches it; its table and JSONL are written."""
    import json
    import sys
    data = {"data": [{"title": "T", "paragraphs": [{"context": c, "qas": [
        {"id": f"q{i}", "question": "Who?", "answers": [{"text": c.split()[0], "answer_start": 0}]}]}
        for i, c in enumerate([SHORT, TEXT[200:400]])]}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import wire_robustness
    assert wire_robustness.main(["--model", "tiny-random", "--squad", str(tmp_path / "d.json"), "--contexts", "2",
                                 "--only", "reference,1 lane", "--out", str(tmp_path / "o")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "o" / "results.jsonl").read_text().splitlines()][1:]
    assert [(r["exact"], r["caught"], r["silent"]) for r in rows] == [(2, 0, 0), (0, 2, 0)]
    assert "| 1 lane (coded with 8) | 0/2 (0%) | 2/2 |" in (tmp_path / "o" / "results.md").read_text()


@pytest.mark.parametrize("kind", ["opt-emb-copy", "opt-kv-copy"])
def test_fitted_kinds_round_trip_in_their_frame_and_refuse_others(tiny, kind, tmp_path):
    """The per-paragraph ceiling's payloads (a fit per paragraph, 2 steps here) travel in the same frame: read
    back by the same kind and ratio, refused by another kind or ratio."""
    opts = {"opt_copy_steps": 2}
    pipe = lw.load_pipeline(kind, lm=tiny, ratio=4, options=opts, out=tmp_path)
    data = lw.wrap(pipe, pipe.send(SHORT))
    assert lw.unwrap(pipe, data) == pipe.send(SHORT)
    # the 1-byte tag may be shared with another label (opt-kv-copy_r4's with learned_r4): the error names both
    with pytest.raises(LatentWireError, match=rf"made by (\S+ or )?{re.escape(pipe.name)}"):
        lw.unwrap(lw.load_pipeline("truncate", lm=tiny, ratio=4), data)
    with pytest.raises(LatentWireError, match="made by"):
        lw.unwrap(lw.load_pipeline(kind, lm=tiny, ratio=2, options=opts, out=tmp_path), data)
