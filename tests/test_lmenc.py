"""The pooled LM encoder (latentwire/encoder/lmenc.py, lmtrain.py) on the tiny random models: pooling math, shapes and
bytes on the wire, the batch assembly against plain forwards, a training step, weights that round-trip and ship,
the first-M control and the answer split in a run."""
import json
import math

import pytest
import torch

import latentwire as lw
from latentwire.config import EncConfig
from latentwire.data import Example, PromptBuilder, synthetic_squad
from latentwire.errors import LatentWireError
from latentwire.llm.forward import head_cache
from latentwire.encoder.lmenc import build_encoder, load_encoder, pool_states, read_meta, save_encoder
from latentwire.encoder.lmtrain import (Para, Row, cpu_has_bf16, loss_step, make_batch, receiver_logits,
                                        split_training, step_precision, teacher_fill, teacher_key, teacher_topk,
                                        train_encoder)
from latentwire.util.runio import TensorStore
from latentwire.pipelines.learned import PooledLMPipeline
from latentwire.pipelines.tokens import budget


def small(**kw) -> EncConfig:
    base = dict(enc_steps_a=2, enc_steps_b=2, enc_batch=3, enc_heldout_paragraphs=2, enc_heldout_questions=3,
                enc_eval_every=2, enc_recon_tokens=16, enc_cont_tokens=8)
    return EncConfig(**(base | kw))


def head_of(builder):
    return builder.build(Example("h", "h", "", "?", ["-"])).head_ids


def test_pool_states_is_the_mean_of_each_group_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 3, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)
    p, m = pool_states(h, mask, 3)
    assert p.shape == (2, 3, 3) and m.tolist() == [[True, True, True], [True, True, False]]
    assert torch.allclose(p[0, 0], h[0, 0:3].mean(0)) and torch.allclose(p[0, 2], h[0, 6])  # a last group of one
    assert torch.allclose(p[1, 1], h[1, 3:5].mean(0))  # the padded positions 5, 6 never count
    # a row pooled alone equals the row pooled in a padded batch
    alone, _ = pool_states(h[1:2, :5], mask[1:2, :5], 3)
    assert torch.allclose(alone[0], p[1, :2])


@pytest.mark.parametrize("dz,bits", [(0, 16), (8, 4), (6, 1), (5, 16)])
def test_payload_bytes_are_exact_and_decode_to_rescaled_vectors(tiny, dz, bits):
    enc = build_encoder(tiny, small(enc_dz=dz, enc_bits=bits))
    pipe = PooledLMPipeline(tiny, enc)
    text = synthetic_squad()[0].context
    ids = pipe.context_ids(text)
    pl = pipe.send(text, ids)
    M = budget(len(ids), 4)
    k = dz or tiny.d_model
    assert pl.positions == M
    want = M * k * 2 if bits == 16 else math.ceil(M * k * bits / 8) + (1 if k * bits < 8 else 0)
    assert len(pl) == want
    v = pipe.receive(pl)
    assert v.shape == (M, tiny.d_model)
    rms = v.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, enc.target_rms.expand_as(rms), rtol=1e-3)  # at the receiver's embedding RMS


def test_first_m_control_reads_only_the_first_m_tokens(tiny):
    enc = build_encoder(tiny, small(enc_input="first-m"))
    pipe = PooledLMPipeline(tiny, enc, meta={})
    ids = list(range(10, 31))  # 21 tokens: M = 6
    src, r = enc.sender_input(ids)
    assert src == ids[:6] and r == 1
    a = pipe.send("a", ids)
    b = pipe.send("b", ids[:6] + [5] * 15)  # what lies beyond the first M tokens changes nothing
    assert a.positions == 6 and bytes(a) == bytes(b)
    assert pipe.name == "lmenc_r4_firstm" and pipe.first_m_of == "lmenc_r4"


def test_embeds_start_hands_the_first_m_control_truncations_embeddings_and_the_wire_each_groups_mean(tiny):
    """--enc-start embeds: an untrained first-M control reads exactly the tokens' embeddings (what truncation hands
    the receiver); at r = 4 each vector is its group's mean embedding at the group's mean token norm; training
    moves the vectors from there (the projector reads the sender's states); a bottleneck refuses it."""
    table = tiny.embedding_table().float()
    ids = list(range(10, 31))  # 21 tokens: M = 6
    ctl = PooledLMPipeline(tiny, build_encoder(tiny, small(enc_input="first-m", enc_start="embeds")), meta={})
    assert torch.allclose(ctl.receive(ctl.send("a", ids)), table[ids[:6]], atol=1e-2, rtol=1e-2)  # 16-bit floats
    assert ctl.name == "lmenc_r4_emb_firstm" and ctl.first_m_of == "lmenc_r4_emb"
    enc = build_encoder(tiny, small(enc_start="embeds"))
    x = torch.tensor([ids])
    v, _ = enc.encode(x, torch.ones_like(x, dtype=torch.bool))
    g = table[ids[4:8]]
    want = g.mean(0) * g.norm(dim=-1).mean() / g.mean(0).norm()
    assert v.shape == (1, 6, tiny.d_model) and torch.allclose(v[0, 1], want, atol=1e-5)
    torch.nn.init.normal_(enc.proj[2].weight)
    moved, _ = enc.encode(x, torch.ones_like(x, dtype=torch.bool))
    assert not torch.allclose(moved, v)
    moved.sum().backward()  # gradients reach the sender's trainable states through the projector
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in enc.named_parameters()
               if n.startswith("sender.") and p.requires_grad)
    with pytest.raises(LatentWireError, match="--enc-start embeds with --enc-dz 8 needs --enc-input first-m"):
        small(enc_start="embeds", enc_dz=8).validate()


def test_side_channel_wire_sends_truncations_ids_and_codes_that_add_to_their_embeddings(tiny, tmp_path):
    """--enc-start embeds --enc-input first-m --enc-dz 8 --enc-bits 4: the payload is M, the first M ids at
    ceil(log2 V) bits and M x 8 codes at 4 bits, exactly; untrained, the receiver reads truncation's embeddings;
    trained codes move them; what lies beyond the first M tokens changes nothing; the weights round-trip."""
    cfg = small(enc_input="first-m", enc_start="embeds", enc_dz=8, enc_bits=4)
    cfg.validate()
    enc = build_encoder(tiny, cfg)
    assert enc.sends_ids
    pipe = PooledLMPipeline(tiny, enc, meta={})
    assert pipe.name == "lmenc_r4_z8x4_emb_firstm"
    table = tiny.embedding_table().float()
    ids = list(range(10, 31))  # 21 tokens: M = 6
    pl = pipe.send("a", ids)
    id_bits = math.ceil(math.log2(table.shape[0]))
    assert pl.positions == 6 and len(pl) == 1 + math.ceil(6 * id_bits / 8) + math.ceil(6 * 8 * 4 / 8)
    assert torch.allclose(pipe.receive(pl), table[ids[:6]], atol=1e-6)  # the ids cross exactly: truncation
    assert bytes(pipe.send("b", ids[:6] + [3] * 15)) == bytes(pl)
    torch.nn.init.normal_(enc.proj[2].weight, std=0.05)
    moved = pipe.decode(bytes(pipe.send("a", ids)))  # receive() memoises per payload; the weights changed
    assert not torch.allclose(moved, table[ids[:6]], atol=1e-3)
    x = torch.tensor([ids[:6]])
    v, _ = enc(x, torch.ones_like(x, dtype=torch.bool), 1)  # training's path (straight-through codes) = the wire's
    assert torch.allclose(v[0], moved, atol=1e-5)
    save_encoder(enc, tmp_path, tiny, cfg, {"steps": 0}, dtype=torch.float32)  # fp32: the same codes, exactly
    again = lw.load_pipeline(str(tmp_path), lm=tiny)
    assert again.enc.sends_ids and torch.allclose(again.receive(again.send("a", ids)), moved, atol=1e-5)


def test_the_batch_assembly_equals_plain_forwards(tiny):
    """receiver_logits builds [head][vectors_b][tail_b] for every row by one gather; each row's logits at its
    trained positions equal a plain forward of that row alone."""
    builder = PromptBuilder(tiny.tokenizer, "fewshot")
    head = head_of(builder)
    hc = head_cache(tiny, head)
    g = torch.Generator().manual_seed(1)
    vecs = torch.randn(2, 4, tiny.d_model, generator=g) * 0.2
    vm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    rows = [Row([1], [5, 6, 7, 8, 9], 2, "qa"), Row([1], [11, 12, 13], 0, "cont")]
    logits, tgt = receiver_logits(tiny, hc, len(head), vecs, vm, rows)
    assert tgt.tolist() == [7, 8, 9, 11, 12, 13]
    with torch.no_grad():
        for b, (r, M) in enumerate(zip(rows, (4, 2))):
            x = torch.cat([tiny.embed(torch.tensor([head]))[0], vecs[b, :M], tiny.embed(torch.tensor([r.tail]))[0]])
            full = tiny.model(inputs_embeds=x[None]).logits[0]
            want = full[len(head) + M + r.t0 - 1:len(head) + M + len(r.tail) - 1]
            got = logits[:3] if b == 0 else logits[3:]
            assert torch.allclose(got, want, atol=1e-4)
    span, _ = receiver_logits(tiny, hc, len(head), vecs, vm, rows, span=True)  # the head over the whole span
    assert torch.allclose(span, logits, atol=1e-5)


def test_teacher_is_the_receiver_reading_the_text(tiny):
    builder = PromptBuilder(tiny.tokenizer, "fewshot")
    head = head_of(builder)
    hc = head_cache(tiny, head)
    rows = [Row([3, 4, 5], [20, 21, 22, 23], 2, "qa", "q1", [3, 4, 5]), Row([7, 8], [30, 31, 32], 1, "qa", "q2", [7, 8])]
    store = TensorStore(None)
    got = teacher_topk(tiny, hc, len(head), rows, 5, store)
    with torch.no_grad():
        for r, (v, ix) in zip(rows, got):
            full = torch.log_softmax(tiny.model(input_ids=torch.tensor([head + r.ctx + r.tail])).logits[0].float(), -1)
            s = len(head) + len(r.ctx) + r.t0 - 1
            want_v, want_ix = full[s:s + len(r.tail) - r.t0].topk(5, -1)
            assert torch.equal(ix, want_ix) and torch.allclose(v, want_v, atol=1e-4)
    assert set(store.memo) == {teacher_key(r) for r in rows}
    again = teacher_topk(tiny, hc, len(head), rows, 5, store)  # read back from the store
    assert torch.equal(again[0][1], got[0][1])


def test_teacher_fill_shares_each_paragraph_and_is_read_back_by_the_next_run(tiny, tmp_path):
    """teacher_fill reads [head][ctx] once per paragraph and its questions' tails after it: the same top-k as
    each question read whole; its shards are read back by a new store (what a later run sees), and only
    questions it lacks are computed."""
    builder = PromptBuilder(tiny.tokenizer, "fewshot")
    head = head_of(builder)
    hc = head_cache(tiny, head)
    paras = [Para([3, 4, 5, 6], [("q1", [20, 21], [22, 23, 24]), ("q2", [25], [26, 27])]),
             Para([7, 8], [("q3", [30, 31, 32], [33])])]
    store = TensorStore(tmp_path / "t")
    assert teacher_fill(tiny, hc, len(head), paras, 5, store) == 3
    rows = [Row(p.ids, t + a, len(t), "qa", q, p.ids) for p in paras for q, t, a in p.questions]
    want = teacher_topk(tiny, hc, len(head), rows, 5, None)  # each question's whole prompt, no store
    for r, (v, ix) in zip(rows, want):
        e = store.get(teacher_key(r))
        assert torch.equal(e["i"].long(), ix) and torch.allclose(e["v"].float(), v, atol=2e-3)
    again = TensorStore(tmp_path / "t")
    assert again.loaded == 3 and teacher_fill(tiny, hc, len(head), paras, 5, again) == 0
    paras[1].questions.append(("q4", [40], [41, 42]))
    assert teacher_fill(tiny, hc, len(head), paras, 5, again) == 1


def test_a_tensor_store_skips_a_torn_shard(tmp_path):
    st = TensorStore(tmp_path)
    st.put("a", {"x": torch.arange(3)})
    st.flush()
    (tmp_path / "shard-torn.safetensors").write_bytes(b"\x00\x01not safetensors")
    back = TensorStore(tmp_path)
    assert back.loaded == 1 and torch.equal(back.get("a")["x"], torch.arange(3))


def test_step_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert step_precision("auto", cuda) == "bf16" and step_precision("fp32", cuda) == "fp32"
    assert step_precision("auto", cpu) == ("bf16" if cpu_has_bf16() else "fp32")
    assert step_precision("bf16", cpu) == "bf16"
    with pytest.raises(LatentWireError, match="--enc-precision"):
        EncConfig(enc_precision="fp8").validate()


@pytest.mark.parametrize("tune", ["full", "lora", "top"])
def test_training_steps_lower_the_loss_and_train_only_what_the_mode_says(tiny, tune):
    torch.manual_seed(0)
    cfg = small(enc_tune=tune, enc_top_layers=1, enc_lora_rank=4, enc_w_kl=0.5)
    enc = build_encoder(tiny, cfg)
    names = [n for n, p in enc.named_parameters() if p.requires_grad]
    sender = [n for n in names if n.startswith("sender.")]
    if tune == "lora":
        assert sender and all("lora_" in n for n in sender)
    elif tune == "top":
        assert sender and all(".layers.1." in n or ".norm." in n for n in sender)
    else:
        assert len(sender) == len(list(enc.sender.parameters()))
    assert not any(p.requires_grad for p in tiny.model.parameters())  # the receiver stays frozen
    builder = PromptBuilder(tiny.tokenizer, "fewshot")
    head = head_of(builder)
    hc = head_cache(tiny, head)
    paras, _ = split_training(synthetic_squad()[:40], builder, cfg)
    rows = make_batch(paras, "B", 0, cfg, [])
    opt = torch.optim.Adam([p for p in enc.parameters() if p.requires_grad], lr=1e-2 if tune != "full" else 3e-3)
    losses = []
    for _ in range(6):
        t = loss_step(enc, tiny, hc, len(head), rows, cfg)
        assert set(t) == {"ce", "kl", "loss"} and torch.isclose(t["loss"], t["ce"] + 0.5 * t["kl"])
        opt.zero_grad()
        t["loss"].backward()
        opt.step()
        losses.append(float(t["loss"].detach()))
    assert losses[-1] < losses[0]


def test_the_side_channel_trains_through_its_4_bit_codes(tiny):
    """The side-channel wire's loss step: gradients pass the 4-bit codes straight through to the sender's top
    block, and a few steps on one batch lower the loss from truncation's (where the untrained wire starts)."""
    torch.manual_seed(0)
    cfg = small(enc_tune="top", enc_top_layers=1, enc_input="first-m", enc_start="embeds", enc_dz=8, enc_bits=4)
    enc = build_encoder(tiny, cfg)
    builder = PromptBuilder(tiny.tokenizer, "fewshot")
    head = head_of(builder)
    hc = head_cache(tiny, head)
    paras, _ = split_training(synthetic_squad()[:40], builder, cfg)
    rows = make_batch(paras, "B", 0, cfg, [])
    opt = torch.optim.Adam([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for i in range(6):
        t = loss_step(enc, tiny, hc, len(head), rows, cfg)
        opt.zero_grad()
        t["loss"].backward()
        if i == 1:  # the projector's last layer starts at zero: from the second step on, gradients reach the sender
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in enc.named_parameters()
                       if n.startswith("sender.") and p.requires_grad)
        opt.step()
        losses.append(float(t["loss"].detach()))
    assert losses[-1] < losses[0]


def test_batches_are_a_function_of_seed_and_step(tiny):
    cfg = small(enc_batch=4)
    builder = PromptBuilder(tiny.tokenizer, "fewshot")
    paras, held = split_training(synthetic_squad()[:60], builder, cfg)
    assert len(held) == 3
    cue = [1, 2]
    a, b = make_batch(paras, "A", 7, cfg, cue), make_batch(paras, "A", 7, cfg, cue)
    assert [(r.enc_ids, r.tail) for r in a] == [(r.enc_ids, r.tail) for r in b]
    assert {r.kind for r in make_batch(paras, "A", 3, small(enc_batch=32), cue)} == {"recon", "cont"}
    for r in make_batch(paras, "A", 3, small(enc_batch=32), cue):
        if r.kind == "recon":
            assert r.tail[:2] == cue and r.t0 == 2 and r.tail[2:] == r.enc_ids[:16]
        else:
            assert r.t0 == 0 and len(r.tail) <= 8
    # --enc-recon-span window: a window anywhere in the paragraph, its anchor read but not trained
    wins = [r for r in make_batch(paras, "A", 3, small(enc_batch=64, enc_recon_span="window", enc_recon_anchor=4),
                                  cue) if r.kind == "recon"]
    starts = set()
    for r in wins:
        body = r.tail[2:]
        w = next(i for i in range(len(r.enc_ids)) if r.enc_ids[i:i + len(body)] == body)
        starts.add(w)
        assert r.tail[:2] == cue and r.t0 == 2 + min(4, len(body)) and len(body) <= 4 + 16
        assert len(body) == min(4 + 16, len(r.enc_ids))  # the window fits: 16 trained tokens after the anchor
    assert len(starts) > 1 and max(starts) > 0
    with pytest.raises(LatentWireError, match="--enc-recon-span"):
        small(enc_recon_span="middle").validate()
    held_ctx = {p.example.context for p in held}
    assert not any(tuple(p.ids) in {tuple(builder.context_ids(c))[:256] for c in held_ctx} for p in paras)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "full"
    builder = PromptBuilder(tiny.tokenizer, "fewshot")
    meta = train_encoder(tiny, synthetic_squad()[:60], builder, small(enc_dz=8, enc_bits=4), out, progress=False,
                         log=lambda *a: None, record={"command": "test"})
    return out, meta


def test_saved_weights_round_trip_and_hold_only_the_trainable_part(tiny, trained):
    out, meta = trained
    assert meta["record"]["steps"] == 4 and meta["record"]["finished"]
    assert (out / "train_log.jsonl").is_file() and (out / "heldout.jsonl").is_file() and (out / "ckpt.pt").is_file()
    assert meta["shape"]["enc_dz"] == 8 and json.loads((out / "encoder.json").read_text())["digest"] == meta["digest"]
    evals = [json.loads(line)["step"] for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert evals == [0, 2, 4]  # the curve starts at the untrained encoder
    enc, _ = load_encoder(tiny, out)
    assert set(enc.trainable_state()) == {k for k, p in enc.named_parameters() if p.requires_grad}
    pipe, again = lw.load_pipeline(str(out), lm=tiny), lw.load_pipeline(str(out), lm=tiny)
    text = synthetic_squad()[5].context
    a, b = pipe.send(text), again.send(text)
    assert bytes(a) == bytes(b) and torch.equal(pipe.receive(a), again.receive(b))
    assert pipe.name == "lmenc_r4_z8x4" and pipe.weights_digest == meta["digest"]


def test_weights_shard_under_the_file_limit(tiny, tmp_path, monkeypatch):
    import latentwire.encoder.lmenc as lmenc
    monkeypatch.setattr(lmenc, "SHARD_BYTES", 20_000)
    enc = build_encoder(tiny, small())
    meta = save_encoder(enc, tmp_path, tiny, small(), {"steps": 0})
    assert len(meta["files"]) > 1
    assert all((tmp_path / f).stat().st_size <= 20_000 + 4096 for f in meta["files"])  # + the JSON header
    back, _ = load_encoder(tiny, tmp_path)
    for k, v in enc.trainable_state().items():
        assert torch.equal(back.trainable_state()[k], v.to(torch.bfloat16).float())


def test_a_folder_for_another_receiver_or_a_damaged_one_is_refused_in_one_line(tiny, trained, tmp_path):
    import shutil

    from latentwire.llm.models import load_model
    out, meta = trained
    other = load_model("tiny-random-b")
    with pytest.raises(LatentWireError, match="trained for a receiver with d_model"):
        load_encoder(other, out)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    m = json.loads((bad / "encoder.json").read_text())
    (bad / "encoder.json").write_text(json.dumps(m | {"format": 99}))
    with pytest.raises(LatentWireError, match="format 99"):
        read_meta(bad)
    (bad / "encoder.json").write_text(json.dumps(m | {"files": ["../x.safetensors"]}))
    with pytest.raises(LatentWireError, match="not in the folder"):
        read_meta(bad)
    (bad / "encoder.json").write_text(json.dumps(m))
    (bad / m["files"][0]).write_bytes(b"not a safetensors file")
    with pytest.raises(LatentWireError, match="not a readable safetensors file"):
        load_encoder(tiny, bad)
    with pytest.raises(LatentWireError, match="no encoder.json"):
        read_meta(tmp_path)


def test_shipped_weights_load_and_answer_without_training(tiny, trained, tmp_path, monkeypatch):
    """`--pipeline learned` with no folder loads the encoder shipped for the receiver (matched by its weights'
    digest); send/ask answer as the evaluation path does. Without shipped weights: one line."""
    import latentwire.encoder.weights as weights
    from conftest import run_cli

    from latentwire.evaluation.generate import generate_predictions
    out, meta = trained
    monkeypatch.setattr(weights, "SHIPPED", tmp_path / "none")
    with pytest.raises(LatentWireError, match="no trained encoder is shipped"):
        lw.load_pipeline("learned", lm=tiny)
    ship = tmp_path / "shipped"
    monkeypatch.setattr(weights, "SHIPPED", ship)
    weights.ship(out, "tiny")
    pipe = lw.load_pipeline("learned", lm=tiny)
    assert isinstance(pipe, PooledLMPipeline) and pipe.weights_digest == meta["digest"]
    ex = synthetic_squad()[70]
    para = tmp_path / "p.txt"
    para.write_text(ex.context)
    r = run_cli("send", "--pipeline", "learned", "--model", "tiny-random", str(para), "-o", str(tmp_path / "l.bin"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "l.bin").read_bytes() == lw.wrap(pipe, pipe.send(ex.context))  # the payload in its frame
    r = run_cli("ask", "--pipeline", "learned", "--model", "tiny-random", str(tmp_path / "l.bin"), ex.question,
                "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    prompt = pipe.builder.build(ex)
    assert r.stdout.rstrip("\n") == generate_predictions(tiny, [prompt], pipe, max_new_tokens=4, progress=False)[0]
    assert r.stdout.rstrip("\n") == lw.ask(pipe, pipe.send(ex.context), ex.question, max_new_tokens=4)


def test_ship_copies_only_the_weights_checked_and_atomically(trained, tmp_path, monkeypatch):
    """weights.ship: encoder.json + the files it names, nothing else; a second ship replaces the folder; weights
    over the limit, a folder that is not an encoder's, or a bad name end in one line and write nothing."""
    from latentwire.encoder.weights import ship
    out, meta = trained
    dest = tmp_path / "shipped"
    f = ship(out, "tiny", dest=dest)
    assert sorted(p.name for p in f.iterdir()) == sorted(meta["files"] + ["encoder.json"])
    assert all((f / n).read_bytes() == (out / n).read_bytes() for n in meta["files"] + ["encoder.json"])
    (f / "stale").write_text("x")
    ship(out, "tiny", dest=dest)  # replaces: the stale file is gone, nothing half-written is left beside it
    assert not (f / "stale").exists() and [p.name for p in dest.iterdir()] == ["tiny"]
    size = sum((out / n).stat().st_size for n in meta["files"])
    with pytest.raises(LatentWireError, match=f"over the {size - 1:,}"):
        ship(out, "big", limit=size - 1, dest=dest)
    with pytest.raises(LatentWireError, match="no encoder.json"):
        ship(tmp_path, "x", dest=dest)
    with pytest.raises(LatentWireError, match="--name"):
        ship(out, "a/b", dest=dest)
    assert [p.name for p in dest.iterdir()] == ["tiny"]
    import shutil
    real = shutil.copyfile

    def fail_on_meta(a, b):  # a copy that dies at its last file (a full disk, a kill)
        if str(b).endswith("encoder.json"):
            raise OSError("disk full")
        return real(a, b)
    monkeypatch.setattr(shutil, "copyfile", fail_on_meta)
    with pytest.raises(OSError):
        ship(out, "tiny", dest=dest)
    assert [p.name for p in dest.iterdir()] == ["tiny"] and (dest / "tiny" / "encoder.json").is_file()


def test_training_stops_at_its_time_limit_and_resumes(tiny, tmp_path):
    builder = PromptBuilder(tiny.tokenizer, "fewshot")
    ex = synthetic_squad()[:60]
    quiet = lambda *a: None  # noqa: E731
    m1 = train_encoder(tiny, ex, builder, small(enc_time_limit=1e-9), tmp_path, progress=False, log=quiet)
    assert m1["record"]["steps"] == 1 and not m1["record"]["finished"]
    with open(tmp_path / "train_log.jsonl", "a") as f:  # a step a killed run logged after its last checkpoint
        f.write(json.dumps({"step": 2, "stage": "A"}) + "\n")
    m2 = train_encoder(tiny, ex, builder, small(), tmp_path, resume=True, progress=False, log=quiet)
    assert m2["record"]["steps"] == 4 and m2["record"]["finished"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_sigterm_ends_the_step_then_saves_what_resume_continues(tiny, tmp_path):
    """A device call's deadline (`timeout` sends SIGTERM) stops training after the step under way, and the folder
    holds the weights, encoder.json and ckpt.pt, as at the time limit."""
    import os
    import signal
    builder = PromptBuilder(tiny.tokenizer, "fewshot")
    ex = synthetic_squad()[:60]
    said, before = [], signal.getsignal(signal.SIGTERM)

    def log(msg):
        said.append(msg)
        if msg.startswith("step 1:"):  # the first held-out evaluation, after step 1
            os.kill(os.getpid(), signal.SIGTERM)
    m = train_encoder(tiny, ex, builder, small(enc_eval_every=1), tmp_path, progress=False, log=log)
    assert m["record"]["steps"] == 1 and not m["record"]["finished"]
    assert any(f"signal {int(signal.SIGTERM)}" in x for x in said)
    assert (tmp_path / "ckpt.pt").is_file() and (tmp_path / "encoder.json").is_file()
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back


def test_train_encoder_command_and_a_run_with_the_first_m_control(tmp_path):
    """`latentwire train-encoder` writes a folder that `latentwire run --pipeline` evaluates beside its controls:
    another paragraph, none, truncation, and the first-M control; the report splits every row by where the
    answer lies."""
    from conftest import run_cli
    common = ["--model", "tiny-random", "--synthetic-articles", "8", "--enc-steps-a", "1", "--enc-steps-b", "1",
              "--enc-batch", "2", "--enc-heldout-paragraphs", "2", "--enc-heldout-questions", "2", "--no-progress"]
    for name, extra in (("full", []), ("fm", ["--enc-input", "first-m"])):
        r = run_cli("train-encoder", *common, *extra, "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        assert "best held-out F1" in r.stdout
    r = run_cli("train-encoder", *common, "--out", str(tmp_path / "full"))
    assert r.returncode == 2 and "already holds a trained encoder" in r.stderr
    r = run_cli("run", "--model", "tiny-random", "--synthetic-articles", "8", "--no-stage1", "--pipeline",
                f"{tmp_path / 'full'},{tmp_path / 'fm'}", "--sequence", "none", "--sequence-ratios", "4",
                "--max-eval", "6", "--max-new-tokens", "4", "--n-boot", "20", "--ac-contexts", "0",
                "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ctl = m["controls"]["lmenc_r4"]
    assert ctl == {"other": "lmenc_r4:other", "none": "none", "truncate": "truncate_r4",
                   "first_m": "lmenc_r4_firstm"}
    assert "first_m" in m["pipelines"]["lmenc_r4"]["controls"]
    split = m["answer_split"]["r4"]
    assert split["within"] + split["beyond"] == 6 and "lmenc_r4" in split["pipelines"]
    assert "## Where the answer lies" in (tmp_path / "run" / "report.md").read_text()
    # in each part, the wire against its first-M control, paired over the same questions
    for part, cell in split["pipelines"]["lmenc_r4"].items():
        assert cell["d_first_m"][0] == pytest.approx(cell["f1"] - split["pipelines"]["lmenc_r4_firstm"][part]["f1"],
                                                     abs=1e-6)
        assert "d_first_m" not in split["pipelines"]["lmenc_r4_firstm"][part]
    assert "ΔF1 vs its first-M control" in (tmp_path / "run" / "report.md").read_text()


def test_cached_bottom_states_give_the_senders_own_states_and_gradients(tiny):
    """--enc-cache-bottom (the CPU variant): the top blocks run on the bottom's cached states and give the
    sender's own final states; the top blocks still train, and a second read of a paragraph hits the cache."""
    torch.manual_seed(0)
    plain = build_encoder(tiny, small(enc_tune="top", enc_top_layers=1))
    cached = build_encoder(tiny, small(enc_tune="top", enc_top_layers=1, enc_cache_bottom=True))
    cached.load_state_dict(plain.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    a, b = plain.states(ids, mask), cached.states(ids, mask)
    assert torch.allclose(a[mask], b[mask], atol=1e-5)
    b[mask].sum().backward()
    assert all(p.grad is not None for n, p in cached.named_parameters() if p.requires_grad and "layers.1" in n)
    cached.states(ids, mask)
    assert cached.bottom.hits == 2 and cached.bottom.misses == 2
    # a prefix (a continuation example, the first-M control) is served from its paragraph's states
    pre = cached.states(ids[:1, :3], mask[:1, :3])
    assert cached.bottom.misses == 2 and torch.allclose(pre[0], a[0, :3], atol=1e-5)
    with pytest.raises(LatentWireError, match="--enc-tune top"):
        small(enc_cache_bottom=True).validate()


def test_bottom_states_fill_once_and_are_read_back_from_their_folder(tiny, tmp_path):
    torch.manual_seed(0)
    enc = build_encoder(tiny, small(enc_tune="top", enc_top_layers=1, enc_cache_bottom=True))
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [10, 11, 12]]
    assert enc.bottom.fill(enc.sender, seqs, tmp_path) == 2
    other = build_encoder(tiny, small(enc_tune="top", enc_top_layers=1, enc_cache_bottom=True))
    other.load_state_dict(enc.state_dict())
    assert other.bottom.fill(other.sender, seqs + [[5, 6, 7]], tmp_path) == 0  # read back; a prefix needs none
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        want = enc.sender(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        got = other.states(ids, torch.ones_like(ids, dtype=torch.bool))
    assert other.bottom.misses == 0 and torch.allclose(got, want, atol=1e-5)


def test_train_encoder_without_an_eval_file_trains(tmp_path):
    """train-encoder holds out its own paragraphs: --squad-train alone is enough."""
    from conftest import run_cli, squad_json
    (tmp_path / "train.json").write_text(json.dumps(squad_json(synthetic_squad(8, 0))))
    r = run_cli("train-encoder", "--model", "tiny-random", "--squad-train", str(tmp_path / "train.json"),
                "--enc-steps-a", "1", "--enc-steps-b", "1", "--enc-batch", "2", "--enc-heldout-paragraphs", "2",
                "--enc-heldout-questions", "2", "--no-progress", "--out", str(tmp_path / "enc"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "enc" / "encoder.json").is_file() and "teacher top-k" in r.stdout


def test_gpu_encoder_script_trains_evaluates_and_archives_on_the_tiny_model(tmp_path):
    """scripts/gpu_encoder.sh end to end as far as a CPU allows (DEVICE=cpu, the tiny model, the synthetic set):
    the encoders train, one run evaluates them with the first-M control, the archives hold what a device
    returns (no optimizer state; each encoder's weights in its own archive); a second call resumes."""
    import os
    import subprocess
    import tarfile
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"DEVICE": "cpu", "MODEL": "tiny-random", "RUNS": "full first-m", "STEPS_A": "1",
                        "STEPS_B": "1", "NQ": "4", "LIMIT": "60", "POLL": "1", "PY": os.sys.executable,
                        "EXTRA": "--enc-batch 2 --enc-heldout-questions 2 --enc-heldout-paragraphs 2",
                        "DATA_EXTRA": "--synthetic-articles 8"}
    out = tmp_path / "g"
    r = subprocess.run(["bash", "scripts/gpu_encoder.sh", "", "", str(out)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["controls"]["lmenc_r4"]["first_m"] == "lmenc_r4_firstm" and m["n_eval"] == 4
    with tarfile.open(f"{out}.tgz") as t:
        names = t.getnames()
    assert "g/eval/report.md" in names and not any(n.endswith((".pt", ".safetensors")) for n in names)
    with tarfile.open(f"{out}-full.tgz") as t:
        assert any(n.endswith(".safetensors") for n in t.getnames()) and "g/full/encoder.json" in t.getnames()
    r = subprocess.run(["bash", "scripts/gpu_encoder.sh", "", "", str(out)], cwd=root, env=env | {"RUNS": "full", "EVAL": "0"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed" in (out / "full.log").read_text()


def test_the_cpu_training_script_keeps_its_weights_and_a_new_machine_continues_from_them(tmp_path):
    """scripts/train_encoder.sh: a piece of training, then its best weights and logs copied to KEEP (no optimizer
    state); a machine without the run folder continues from KEEP with the same recipe, and KEEP follows it."""
    import os
    import subprocess
    from pathlib import Path

    from conftest import squad_json
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "train.json").write_text(json.dumps(squad_json(synthetic_squad(8, 0))))
    env = os.environ | {"PY": os.sys.executable, "SQUAD_TRAIN": str(tmp_path / "train.json"),
                        "RUN": str(tmp_path / "run"), "KEEP": str(tmp_path / "keep")}
    tiny = ["--model", "tiny-random", "--enc-batch", "2", "--enc-heldout-paragraphs", "2", "--enc-heldout-questions",
            "2", "--enc-eval-every", "1", "--no-progress"]
    r = subprocess.run(["bash", "scripts/train_encoder.sh", *tiny, "--enc-steps-a", "1", "--enc-steps-b", "1"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    kept = sorted(p.name for p in (tmp_path / "keep").iterdir())
    assert "encoder.json" in kept and "heldout.jsonl" in kept and not any(k.endswith(".pt") for k in kept)
    assert any(k.endswith(".safetensors") for k in kept)
    import shutil
    shutil.rmtree(tmp_path / "run")  # a new machine: the committed folder only
    r = subprocess.run(["bash", "scripts/train_encoder.sh", *tiny, "--enc-steps-a", "1", "--enc-steps-b", "2"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "continuing from" in r.stdout and "resumed the weights" in r.stdout
    meta = json.loads((tmp_path / "keep" / "encoder.json").read_text())
    assert meta["record"]["steps"] == 3 and meta["record"]["finished"]


@pytest.mark.integration
def test_the_encoder_on_the_real_default_model(smollm, tmp_path):
    """SmolLM2-135M: a LoRA-16 encoder (untrained) sends the example paragraph as M x 576 fp16 values, its
    weights (the adapters and the projector, bf16) fit one file under the 16 MB a GPU device returns, and
    they load back to the same payload."""
    from pathlib import Path
    cfg = EncConfig(enc_tune="lora", enc_lora_rank=16)
    torch.manual_seed(0)
    enc = build_encoder(smollm, cfg)
    meta = save_encoder(enc, tmp_path, smollm, cfg, {"steps": 0})
    assert len(meta["files"]) == 1 and (tmp_path / meta["files"][0]).stat().st_size < 16_000_000
    text = (Path(__file__).resolve().parents[1] / "examples" / "paragraph.txt").read_text()
    pipe = lw.load_pipeline(str(tmp_path), lm=smollm)
    pl = pipe.send(" ".join(text.split()))
    ids = pipe.context_ids(" ".join(text.split()))
    assert pl.positions == budget(len(ids), 4) and len(pl) == pl.positions * 576 * 2
    assert pipe.receive(pl).shape == (pl.positions, 576)
    assert bytes(PooledLMPipeline(smollm, load_encoder(smollm, tmp_path)[0]).send(" ".join(text.split()))) == bytes(pl)


def test_encoder_cost_benchmark_prints_its_table(tmp_path):
    """benchmarks/encoder_cost.py on the tiny model: a row per lever with both stages' step times and examples/s,
    the stored caches' costs, the receiver's own bound, and the hours to the GPU run's examples; results.jsonl and
    table.md written; an unknown row refused in one line."""
    import sys
    from pathlib import Path

    from conftest import run_script
    root = Path(__file__).resolve().parents[1]
    r = run_script([sys.executable, str(root / "benchmarks" / "encoder_cost.py"), "--model", "tiny-random",
                    "--batch", "2", "--repeats", "1", "--fill", "2", "--levers", "base,head,bottom,receiver",
                    "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [x["lever"] for x in rows] == ["base", "head", "bottom", "receiver"]
    assert rows[0]["threads"] == 1 and rows[0]["precision"] == "fp32" and rows[0]["head"] == "span"
    assert rows[1]["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert rows[1]["threads"] == 2 and rows[1]["head"] == "trained positions"
    assert all(x["step_s_A"] > 0 and x["examples_per_s_B"] > 0 and x["hours_to_gpu_examples"] > 0 for x in rows)
    assert rows[2]["bottom_s_per_paragraph"] > 0 and rows[2]["teacher_s_per_question"] > 0
    assert "| bottom |" in r.stdout and "load average" in (tmp_path / "table.md").read_text()
    assert "oneDNN bf16 native" in r.stdout and rows[0]["matmul"][0]["fp32_gflops"] > 0
    bad = run_script([sys.executable, str(root / "benchmarks" / "encoder_cost.py"), "--levers", "nope"])
    assert bad.returncode == 2 and "--levers nope" in bad.stderr


def test_an_encoder_payload_file_names_its_weights(tiny, trained, tmp_path):
    """The frame of an encoder's payload file carries its weights' fingerprint: another encoder of the same shape
    (other weights) refuses it in one line; the same folder reads it back."""
    import shutil
    out, meta = trained
    pipe = lw.load_pipeline(str(out), lm=tiny)
    data = lw.wrap(pipe, pipe.send(synthetic_squad()[3].context))
    assert lw.unwrap(pipe, data) == bytes(pipe.send(synthetic_squad()[3].context))
    other = tmp_path / "other"
    shutil.copytree(out, other)
    enc, _ = load_encoder(tiny, other)
    with torch.no_grad():
        enc.proj[2].bias.add_(1.0)
    save_encoder(enc, other, tiny, small(enc_dz=8, enc_bits=4), {"steps": 0})
    with pytest.raises(LatentWireError, match="weights"):
        lw.unwrap(lw.load_pipeline(str(other), lm=tiny), data)


def test_step_host_benchmark_counts_a_steps_ops_and_flops(tmp_path):
    """benchmarks/step_host.py on the tiny model's graph: both stages' rows, their op counts and FLOPs."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import step_host
    assert step_host.main(["--model", "tiny-random", "--batch", "3", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["A", "B"]
    a, b = rows
    assert a["forward_ops"] > 0 and a["backward_nodes"] > 0 and a["teacher_tokens"] == 0 < b["teacher_tokens"]
    assert b["tflop"] > 0 and b["peak_bound_steps_s"] == pytest.approx(1000 / b["peak_ms"])
    assert "| B |" in (tmp_path / "table.md").read_text()
    assert step_host.main(["--model", "tiny-random", "--tokens", "2", "--out", str(tmp_path)]) == 2


def test_encoder_curves_running_mean():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from encoder_curves import running_mean
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0], 5) == [2.0, 3.0] and running_mean([], 3) == []


def test_encoder_curves_plots_runs_against_references_and_reuses_them(tmp_path):
    """benchmarks/encoder_curves.py on a tiny run: the curves' table (every evaluation, against truncation), the
    plot, the references on the run's held-out questions computed once and then reused, said so; a folder without
    evaluations refused in one line."""
    import sys
    from pathlib import Path

    from conftest import run_cli, run_script, squad_json
    (tmp_path / "train.json").write_text(json.dumps(squad_json(synthetic_squad(8, 0))))
    r = run_cli("train-encoder", "--model", "tiny-random", "--squad-train", str(tmp_path / "train.json"),
                "--enc-steps-a", "1", "--enc-steps-b", "1", "--enc-batch", "2", "--enc-heldout-paragraphs", "2",
                "--enc-heldout-questions", "3", "--enc-eval-every", "1", "--no-progress", "--out", str(tmp_path / "e"))
    assert r.returncode == 0, r.stderr
    script = [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "encoder_curves.py"),
              "--runs", str(tmp_path / "e"), "--out", str(tmp_path / "c")]
    first = run_script(script)
    assert first.returncode == 0, first.stderr
    assert "| e | 1 | 2 |" in first.stdout and "| e | 2 | 4 |" in first.stdout and "truncate r=4" in first.stdout
    assert (tmp_path / "c" / "curves.png").stat().st_size > 0 and "reused" not in first.stdout
    assert (tmp_path / "c" / "losses.png").stat().st_size > 0  # the training losses the run logged
    again = run_script(script)
    assert again.returncode == 0 and "references reused" in again.stdout
    refs = json.loads((tmp_path / "c" / "references.json").read_text())
    curves = json.loads((tmp_path / "c" / "curves.json").read_text())
    assert curves["references"] == refs["f1"]
    # each evaluation logged its questions' scores: the mean is theirs, and the curve pairs them with truncation
    evals = [json.loads(line) for line in (tmp_path / "e" / "heldout.jsonl").read_text().splitlines()]
    for e, p in zip(evals, curves["runs"][0]["points"]):
        assert len(e["f1s"]) == 3 and e["heldout_f1"] == pytest.approx(100 * sum(e["f1s"]) / 3, abs=0.01)
        d = 100 * (sum(e["f1s"]) - sum(refs["scores"]["truncate"])) / 3
        assert p["d_trunc"][0] == pytest.approx(d, abs=0.01) and p["ci"][0] <= p["f1"] + 1e-6 <= p["ci"][1] + 2e-6
    # a second run (every answer right) paired with the first at each step, on the same questions
    import shutil
    shutil.copytree(tmp_path / "e", tmp_path / "e2")
    (tmp_path / "e2" / "heldout.jsonl").write_text("".join(
        json.dumps(e | {"f1s": [1.0] * 3, "heldout_f1": 100.0}) + "\n" for e in evals))
    two = run_script(script + ["--runs", str(tmp_path / "e2")])
    assert two.returncode == 0, two.stderr
    assert "vs e at the same step (paired)" in two.stdout
    runs2 = json.loads((tmp_path / "c" / "curves.json").read_text())["runs"]
    for e, p in zip(evals, runs2[1]["points"]):
        assert p["d_base"][0] == pytest.approx(100 - 100 * sum(e["f1s"]) / 3, abs=0.01)
    assert all("d_base" not in p for p in runs2[0]["points"])
    # the training losses on the same steps: e2 is a copy of e, so every term's difference is 0
    assert "| e2 | A | ce | 1 |" in two.stdout and "| e2 | B | ce | 1 |" in two.stdout
    assert all(line.endswith("| +0.000 |") for line in two.stdout.splitlines() if line.startswith("| e2 | A |")
               or line.startswith("| e2 | B |"))
    nope = run_script(script + ["--paired-with", "nope"])
    assert nope.returncode == 2 and "--paired-with nope" in nope.stderr
    # a run logged before the scores were (no f1s): its points keep the mean, without an interval
    (tmp_path / "e" / "heldout.jsonl").write_text("".join(
        json.dumps({k: v for k, v in e.items() if k != "f1s"}) + "\n" for e in evals))
    old = run_script(script)
    assert old.returncode == 0 and "| e | 1 | 2 |" in old.stdout and " [" not in old.stdout.split("| e | 1 | 2 |")[1]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text((tmp_path / "e" / "config.json").read_text())
    bad = run_script(script[:2] + ["--runs", str(tmp_path / "x"), "--out", str(tmp_path / "c")])
    assert bad.returncode == 2 and "no held-out evaluation" in bad.stderr
