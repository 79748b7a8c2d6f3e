"""The learned sequence compressor on the tiny random model: shapes and masks
(M = ceil(L / r) latents, padding), exact bytes, the teacher's cached
outputs, the loss against a direct computation, resume, and equal answers
batched and one at a time."""
import math

import pytest
import torch

from latentwire.config import SeqConfig
from latentwire.data import PromptBuilder, synthetic_squad
from latentwire.evaluation.generate import EvalSwitches, generate_predictions, span_payloads
from latentwire.util.runio import read_jsonl
from latentwire.pipelines.learned import LearnedSeqPipeline
from latentwire.pipelines.tokens import budget
from latentwire.wire.wire import bounded_quantizer
from latentwire.encoder.seqcomp import (SeqCompressor, answer_ids, build_compressor,
                                cached_items, collate, context_states, head_cache, load_compressor,
                                prepare_learned, reference_losses, resolve_layer, save_compressor, seq_loss, teacher_topk,
                                train_seq)


@pytest.fixture(scope="module")
def prompts(tiny):
    b = PromptBuilder(tiny.tokenizer, "fewshot", 512)
    return [b.build(e) for e in synthetic_squad(6, seed=7)][:12]


@pytest.fixture(scope="module")
def setup(tiny, prompts):
    torch.manual_seed(0)
    cfg = SeqConfig(seq_ratio=4, seq_width=32, seq_dim=8, seq_bits=2, seq_steps=4, seq_batch=3, seq_teacher_topk=16,
                    seq_ckpt_every=2, seq_warmup=1)
    layer = resolve_layer(tiny, None)
    hc = head_cache(tiny, prompts[0].head_ids)
    return cfg, layer, hc


def test_encode_shapes_and_masks(gen):
    comp = SeqCompressor(12, 10, ratio=4, width=16, layers=1, dim=6, bits=3)
    h = torch.randn(3, 9, 12, generator=gen)
    lens = [9, 5, 1]
    mask = torch.arange(9)[None] < torch.tensor(lens)[:, None]
    z, m = comp.encode(h, mask)
    assert z.shape == (3, 3, 6) and z.abs().max() <= 1
    assert m.sum(1).tolist() == [budget(n, 4) for n in lens]
    # a row's latents do not depend on the padding beside it, nor on other rows
    z1, _ = comp.encode(h[1:2, :5], mask[1:2, :5])
    assert torch.allclose(z1[0], z[1, :2], atol=1e-5)
    y, ym = comp(h, mask)
    assert y.shape == (3, 3, 10) and torch.equal(ym, m)
    # the receiver's output sits at the gain's RMS (the embedding table's scale)
    assert torch.allclose(y.pow(2).mean(-1).sqrt(), comp.gain.detach().expand(3, 3), rtol=1e-3)


def test_bounded_quantizer_is_exact_on_its_levels():
    q = bounded_quantizer(2, 3)
    lv = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    z = lv[torch.tensor([[0, 1, 2], [3, 3, 0]])]
    assert torch.equal(q.from_bytes(q.to_bytes(z), 3), z)
    # rows of >= 8 bits: exactly M x dim x bits; narrower rows carry a 1-byte varint count
    assert len(bounded_quantizer(2, 4).to_bytes(torch.zeros(5, 4))) == 5
    assert len(q.to_bytes(torch.zeros(5, 3))) == 1 + math.ceil(5 * 3 * 2 / 8)


def test_payload_bytes_positions_and_receive(tiny, prompts, setup):
    cfg, layer, _ = setup
    comp = build_compressor(tiny, cfg).eval()
    pipe = LearnedSeqPipeline(tiny, comp, layer)
    payloads, ntok = span_payloads(pipe, prompts, EvalSwitches())
    for pl, n in zip(payloads, ntok):
        m = budget(n, 4)
        assert pl.positions == m and pl.nbytes == math.ceil(m * cfg.seq_dim * cfg.seq_bits / 8)
    p = prompts[0]
    got = pipe.receive(pipe.payload(p.context_ids, p.context_text))
    h = context_states(tiny, p.context_ids, layer)
    with torch.no_grad():
        want = comp.decode(comp.quantizer.roundtrip(comp.encode(h[None], torch.ones(1, len(h), dtype=torch.bool))[0][0]))
    assert got.shape == (budget(len(p.context_ids), 4), tiny.d_model) and torch.allclose(got, want, atol=1e-5)


def test_teacher_topk_equals_a_full_forward(tiny, prompts, setup):
    cfg, layer, hc = setup
    ps = [p for p in prompts if p.context_ids == prompts[0].context_ids]
    rows = [(list(p.ids[p.ctx_end:]), answer_ids(tiny.tokenizer, p.example.answers[0])) for p in ps]
    got = teacher_topk(tiny, hc, len(ps[0].head_ids), ps[0].context_ids, rows, 8)
    for p, (t, a), (v, ix) in zip(ps, rows, got):
        full = torch.tensor([p.ids + a])
        with torch.no_grad():
            lp = torch.log_softmax(tiny.model(input_ids=full).logits[0].float(), -1)
        want = lp[len(p.ids) - 1:len(p.ids) - 1 + len(a)]
        wv, wi = want.topk(8, -1)
        assert torch.allclose(v, wv, atol=1e-4) and torch.equal(ix, wi)


def test_items_are_cached_by_key(tiny, prompts, setup, tmp_path):
    cfg, layer, hc = setup
    path = tmp_path / "seq_teacher"
    a, reused_a = cached_items(tiny, prompts, layer, 16, hc, len(prompts[0].head_ids), path, progress=False)
    b, reused_b = cached_items(tiny, prompts, layer, 16, hc, len(prompts[0].head_ids), path, progress=False)
    assert (reused_a, reused_b) == (False, True) and len(a) == len(prompts)
    assert all(torch.equal(x["t_logp"], y["t_logp"]) and x["ans"] == y["ans"] for x, y in zip(a, b))
    # a different top-k (or model, layer, prompts) is not read from the cache
    _, reused_c = cached_items(tiny, prompts, layer, 8, hc, len(prompts[0].head_ids), path, progress=False)
    assert not reused_c


def test_loss_matches_a_direct_computation(tiny, prompts, setup):
    """The student's CE through the head cache equals the CE of one plain
    forward over [head][latents][tail][answer] embeddings."""
    cfg, layer, hc = setup
    items, _ = cached_items(tiny, prompts[:2], layer, 16, hc, len(prompts[0].head_ids), None, progress=False)
    comp = build_compressor(tiny, cfg).eval()
    batch = collate(items)
    terms = seq_loss(tiny, comp, batch, hc, len(prompts[0].head_ids), cfg)
    ce, n = 0.0, 0
    for i, (it, p) in enumerate(zip(items, prompts[:2])):
        with torch.no_grad():
            y, _ = comp(it["h"][None].float(), torch.ones(1, len(it["h"]), dtype=torch.bool))
            e = torch.cat([tiny.embed(torch.tensor(p.head_ids)).float(), y[0],
                           tiny.embed(torch.tensor(it["tail"] + it["ans"])).float()])
            lp = torch.log_softmax(tiny.model(inputs_embeds=e[None]).logits[0].float(), -1)
        s = len(p.head_ids) + y.shape[1] + len(it["tail"]) - 1
        ce -= float(lp[s:s + len(it["ans"])].gather(-1, torch.tensor(it["ans"])[:, None]).sum())
        n += len(it["ans"])
    assert abs(float(terms["ce"].detach()) - ce / n) < 1e-3
    assert float(terms["kl"]) >= -1e-5 and set(terms) == {"ce", "kl", "loss", "positions"}


def test_reference_losses_match_plain_forwards(tiny, prompts, setup):
    """The yardsticks of the loss curve: reading the whole context as text
    is the teacher's own input (its KL is the top-k term's floor); truncation's and
    no-context CE equal plain forwards over [head][cut context][tail][answer]."""
    cfg, layer, hc = setup
    items, _ = cached_items(tiny, prompts[:5], layer, 16, hc, len(prompts[0].head_ids), None, progress=False)
    refs = reference_losses(tiny, items, hc, len(prompts[0].head_ids), ratio=4, n=5, batch=2)
    assert set(refs) == {"text", "truncate", "none"} and refs["text"]["questions"] == 5
    # the teacher's own input: its KL is the floor of the top-k KL term, -log(mass the top-k holds)
    floor = torch.cat([-torch.logsumexp(it["t_logp"].float(), -1) for it in items]).mean()
    assert refs["text"]["kl"] == pytest.approx(float(floor), abs=2e-3)
    assert refs["truncate"]["kl"] > refs["text"]["kl"]
    head = list(prompts[0].head_ids)
    for name, cut in (("truncate", lambda c: c[:budget(len(c), 4)]), ("none", lambda c: [])):
        ce, n = 0.0, 0
        for it in items:
            ids = head + cut(it["ctx"]) + it["tail"] + it["ans"]
            with torch.no_grad():
                lp = torch.log_softmax(tiny.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            s = len(ids) - len(it["ans"]) - 1
            ce -= float(lp[s:s + len(it["ans"])].gather(-1, torch.tensor(it["ans"])[:, None]).sum())
            n += len(it["ans"])
        assert refs[name]["ce"] == pytest.approx(ce / n, abs=1e-3)
    assert reference_losses(tiny, items, hc, len(head), 4, n=0) == {}


def test_training_lowers_the_loss_and_resumes_exactly(tiny, prompts, setup, tmp_path):
    cfg, layer, hc = setup
    n_head = len(prompts[0].head_ids)
    items, _ = cached_items(tiny, prompts, layer, 16, hc, n_head, None, progress=False)
    torch.manual_seed(0)
    full = build_compressor(tiny, cfg)
    init = {k: v.clone() for k, v in full.state_dict().items()}
    s = train_seq(tiny, full, items, hc, n_head, cfg, tmp_path / "a", seed=1, progress=False)
    assert s["steps"] == 4 and all(not torch.equal(init[k], v) for k, v in full.state_dict().items()
                                   if k in ("query", "code.weight"))
    # stop after 2 steps, resume to 4: the same weights as 4 steps straight
    part = build_compressor(tiny, cfg)
    part.load_state_dict(init)
    train_seq(tiny, part, items, hc, n_head, cfg, tmp_path / "b", seed=1, progress=False, stop_after=2)
    again = build_compressor(tiny, cfg)
    train_seq(tiny, again, items, hc, n_head, cfg, tmp_path / "b", seed=1, progress=False, resume=True)
    for k, v in full.state_dict().items():
        assert torch.allclose(v, again.state_dict()[k], atol=1e-6), k
    # more steps lower the training loss (a fixed batch, plain overfitting check)
    comp = build_compressor(tiny, cfg)
    opt = torch.optim.Adam(comp.parameters(), lr=1e-2)
    batch = collate(items[:3])
    losses = []
    for _ in range(15):
        t = seq_loss(tiny, comp, batch, hc, n_head, cfg)
        opt.zero_grad()
        t["loss"].backward()
        opt.step()
        losses.append(float(t["loss"]))
    assert losses[-1] < losses[0]


def test_save_load_and_batched_answers(tiny, prompts, setup, tmp_path):
    cfg, layer, _ = setup
    comp = build_compressor(tiny, cfg).eval()
    save_compressor(comp, tmp_path / "seq_compressor.pt", {"model": tiny.fingerprint(), "shape": {
        "ratio": 4, "width": cfg.seq_width, "layers": cfg.seq_layers, "dim": cfg.seq_dim, "bits": cfg.seq_bits,
        "layer": layer}})
    back, meta = load_compressor(tiny, tmp_path / "seq_compressor.pt")
    for k, v in comp.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    pipe = LearnedSeqPipeline(tiny, back, meta["shape"]["layer"])
    sw = EvalSwitches()
    batched = generate_predictions(tiny, prompts, pipe, sw, batch_size=5, max_new_tokens=6, progress=False)
    one = generate_predictions(tiny, prompts, pipe, sw, batch_size=1, max_new_tokens=6, progress=False,
                               share_prefix=False)
    assert batched == one


def test_prepare_learned_trains_saves_and_loads(tiny, prompts, tmp_path):
    cfg = SeqConfig(seq_ratio=2, seq_width=16, seq_dim=4, seq_bits=1, seq_steps=2, seq_batch=2, seq_teacher_topk=4,
                    seq_layers=0)
    comp, layer, summary = prepare_learned(tiny, cfg, prompts[:4], prompts[0].head_ids, tmp_path, 0, False, False,
                                           log=lambda *a: None)
    pipe = LearnedSeqPipeline(tiny, comp, layer)
    assert summary["steps"] == 2 and summary["questions"] == 4 and (tmp_path / "seq_compressor.pt").exists()
    assert (tmp_path / "seq_train_log.jsonl").exists() and not summary["cache_reused"]
    # a second training of another seed reads the teacher from the cache ($LATENTWIRE_CACHE, a temp dir in tests)
    _, _, again = prepare_learned(tiny, SeqConfig(**{**cfg.__dict__, "seq_seed": 1}), prompts[:4], prompts[0].head_ids,
                               tmp_path / "b", 0, False, False, log=lambda *a: None)
    assert again["cache_reused"]
    cfg2 = SeqConfig(seq_path=str(tmp_path / "seq_compressor.pt"))
    comp2, layer2, s2 = prepare_learned(tiny, cfg2, [], [], tmp_path, 0, False, False)
    pipe2 = LearnedSeqPipeline(tiny, comp2, layer2)
    p = prompts[0]
    assert pipe2.send("", p.context_ids) == pipe.send("", p.context_ids)
    assert pipe2.comp.ratio == 2 and s2["loaded_from"]


def test_run_with_the_learned_compressor_only(tmp_path):
    """`latentwire run --sequence learned,truncate --no-stage1`: trains, saves,
    evaluates on the wire beside the baseline and its controls (another
    paragraph's payload, nothing -- added by the run); nothing of Stage 1 is made."""
    from conftest import tiny_learned_config
    from latentwire.evaluation.run import run_experiment
    m = run_experiment(tiny_learned_config(tmp_path / "run"), use_cache=False, log=lambda *a: None)
    assert set(m["pipelines"]) == {"text", "learned_r4", "learned_r4:other", "truncate_r4", "none"}
    assert m["controls"] == {"learned_r4": {"other": "learned_r4:other", "none": "none", "truncate": "truncate_r4"}}
    ctl = m["pipelines"]["learned_r4"]["controls"]
    assert set(ctl) == {"other", "none", "truncate"} and all(len(c["d_f1"]) == 3 for c in ctl.values())
    for name in ("learned_r4", "learned_r4:other", "truncate_r4", "none", "text"):
        probe = m["pipelines"][name]["reading_probe"]
        assert 0 <= probe["recon_acc"] <= 1 and probe["contexts"] > 0
    assert "against their controls" in (tmp_path / "run" / "report.md").read_text()
    e, t = m["pipelines"]["learned_r4"], m["pipelines"]["truncate_r4"]
    assert e["wire"]["positions_mean"] == t["wire"]["positions_mean"]  # equal positions: M = ceil(L / 4) both
    assert e["wire"]["bits_per_token"] == pytest.approx(4 * 2 / 4, rel=0.3)  # 4 dims x 2 bits per 4 tokens
    assert m["compressor"] is None and m["seq_train"]["steps"] == 2
    run = tmp_path / "run"
    assert (run / "seq_compressor.pt").exists() and not (run / "compressor.pt").exists()
    assert "learned sequence compressor" in (run / "report.md").read_text()
    assert (run / "seq_training.png").exists()
    refs = m["seq_train"]["reference"]  # the loss curve's yardsticks: logged, summarised, reported
    assert set(refs) == {"text", "truncate", "none"}
    assert any(r.get("event") == "reference" for r in read_jsonl(run / "seq_train_log.jsonl"))
    assert "for the references on" in (run / "report.md").read_text()


def test_pretraining_reconstructs_the_context_first(tiny, prompts, setup, tmp_path):
    """--seq-pretrain-steps: the first steps train on one item per paragraph
    whose target is the context itself (CE only), then the QA steps."""
    from dataclasses import replace

    from latentwire.util.runio import read_jsonl
    from latentwire.encoder.seqcomp import autoencode_items
    cfg, layer, hc = setup
    n_head = len(prompts[0].head_ids)
    items, _ = cached_items(tiny, prompts, layer, 16, hc, n_head, None, progress=False)
    pre = autoencode_items(items, max_tokens=5)
    assert len(pre) == len({tuple(p.context_ids) for p in prompts})
    assert all(x["tail"] == [] and x["ans"] == x["ctx"][:5] and "t_logp" not in x for x in pre)
    t = seq_loss(tiny, build_compressor(tiny, cfg), collate(pre[:2]), hc, n_head, cfg)
    assert float(t["kl"]) == 0.0 and torch.equal(t["loss"], t["ce"])
    c2 = replace(cfg, seq_pretrain_steps=2, seq_steps=2)
    s = train_seq(tiny, build_compressor(tiny, c2), items, hc, n_head, c2, tmp_path, progress=False)
    stages = [r["stage"] for r in read_jsonl(tmp_path / "seq_train_log.jsonl") if r.get("event") == "step"]
    assert stages == ["pretrain", "pretrain", "qa", "qa"] and s["steps"] == 4


def test_vocab_decoder_reads_convex_combinations_of_the_table(tiny, gen):
    """--seq-decoder vocab: every vector the receiver reads is a convex combination of its embedding rows."""
    table = tiny.embedding_table()
    comp = SeqCompressor(tiny.d_model, tiny.d_model, ratio=1, width=16, layers=0, dim=4, bits=16, decoder="vocab",
                         table=table)
    z = torch.rand(5, 4, generator=gen) * 2 - 1
    w = torch.softmax(comp.vocab_logits(z), -1)  # [5, V]: non-negative, summing to 1
    assert w.shape == (5, tiny.vocab_size) and bool((w >= 0).all())
    assert torch.allclose(w.sum(-1), torch.ones(5)) and torch.allclose(comp.decode(z), w @ table, atol=1e-5)
    with pytest.raises(ValueError):
        SeqCompressor(4, 4, ratio=1, decoder="vocab")


def test_token_reconstruction_learns_to_send_every_token(tiny, prompts, setup, tmp_path):
    """--seq-recon-steps at r = 1 with the vocab decoder and the embeddings as input (layer 0): the training
    path learns to carry each token (window accuracy rises well above chance); the run logs the stage and its
    throughput; a saved compressor keeps its decoder kind."""
    from dataclasses import replace

    from latentwire.encoder.seqcomp import autoencode_items, recon_loss
    _, _, hc = setup
    n_head = len(prompts[0].head_ids)
    cfg = SeqConfig(seq_ratio=1, seq_width=64, seq_layers=0, seq_dim=16, seq_bits=16, seq_decoder="vocab",
                    seq_recon_steps=60, seq_steps=0, seq_batch=4, seq_lr=1e-2, seq_warmup=1, seq_layer=0)
    items, _ = cached_items(tiny, prompts, 0, 4, hc, n_head, None, progress=False)
    pre = autoencode_items(items)
    torch.manual_seed(0)
    comp = build_compressor(tiny, cfg)
    before = float(recon_loss(comp, collate(pre))["acc"])
    s = train_seq(tiny, comp, items, hc, n_head, cfg, tmp_path, progress=False)
    after = float(recon_loss(comp, collate(pre))["acc"])
    assert after > max(0.5, before + 0.3), (before, after)
    assert s["recon_steps"] == 60 and s["positions_per_s"]["recon"] > 0
    stages = {r["stage"] for r in read_jsonl(tmp_path / "seq_train_log.jsonl") if r.get("event") == "step"}
    assert stages == {"recon"}
    save_compressor(comp, tmp_path / "c.pt", {"model": tiny.fingerprint(), "sender": tiny.fingerprint(),
                                               "shape": {"ratio": 1, "width": 64, "layers": 0, "dim": 16, "bits": 16,
                                                         "layer": 0, "decoder": "vocab"}})
    back, meta = load_compressor(tiny, tmp_path / "c.pt")
    assert back.decoder == "vocab" and torch.equal(back.decode(torch.zeros(1, 16)), comp.decode(torch.zeros(1, 16)))
    with pytest.raises(Exception, match="--seq-decoder vocab"):
        replace(cfg, seq_decoder="mlp").validate()


def test_layer_zero_states_are_the_input_embeddings(tiny, prompts):
    """Layer 0 skips the forward pass; it must equal hidden_states[0] of one."""
    ids = prompts[0].context_ids
    with torch.no_grad():
        full = tiny.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert torch.allclose(context_states(tiny, ids, 0), full[0][0].float(), atol=1e-6)
    assert torch.allclose(context_states(tiny, ids, 1), full[1][0].float(), atol=1e-5)


def test_reconstruction_only_runs_skip_the_teacher(tiny, prompts, setup):
    """Without QA steps nothing reads the teacher: items carry no top-k."""
    cfg, layer, hc = setup
    items, _ = cached_items(tiny, prompts[:3], layer, 0, hc, len(prompts[0].head_ids), None, progress=False)
    assert len(items) == 3 and "t_logp" not in items[0] and items[0]["ctx"] == list(prompts[0].context_ids)
