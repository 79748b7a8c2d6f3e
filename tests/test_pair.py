"""A sender model and a different receiver (--sender-model): two tiny random
models with different vocabularies (384 vs 512) and widths (64 vs 96)."""
import math

import pytest
import torch

from latentwire.config import RunConfig
from latentwire.data import PromptBuilder, context_token_ids, synthetic_squad
from latentwire.errors import LatentWireError
from latentwire.evaluation.generate import generate_predictions
from latentwire.pipelines.cross import CrossModelPipeline, SenderIdsPipeline, cross_pipelines, ids_to_text
from latentwire.pipelines.tokens import TokenSelectPipeline, budget
from latentwire.pipelines import BuildContext, build


@pytest.fixture(scope="module")
def other():
    from latentwire.llm.models import load_model
    return load_model("tiny-random-b")


@pytest.fixture(scope="module")
def prompts(tiny):
    b = PromptBuilder(tiny.tokenizer, "fewshot", 512)
    return [b.build(e) for e in synthetic_squad(6, seed=7)][:10]


def test_the_two_tiny_models_differ(tiny, other):
    assert (tiny.vocab_size, tiny.d_model) != (other.vocab_size, other.d_model)
    text = "The committee met in Geneva in 1898."
    assert context_token_ids(tiny.tokenizer, text) != context_token_ids(other.tokenizer, text)


def test_text_round_trip_through_the_sender_is_exact(tiny, other, prompts):
    # truncation at r = 1 keeps every sender token: the receiver must read exactly its own tokens of the context
    p = CrossModelPipeline(TokenSelectPipeline("truncate", 1, other.vocab_size), other.tokenizer, tiny.tokenizer,
                           "b")
    for pr in prompts:
        pl = p.payload(pr.context_ids, pr.context_text)
        s_ids = context_token_ids(other.tokenizer, pr.context_text)
        assert pl.nbytes == math.ceil(len(s_ids) * math.ceil(math.log2(other.vocab_size)) / 8)  # sender's bits
        assert p.receive(pl).tolist() == pr.context_ids
        assert pl.positions == len(pr.context_ids)  # positions counted on the receiver


@pytest.mark.parametrize("kind", ["truncate", "surprisal"])
def test_cross_token_pipelines_choose_on_the_sender(tiny, other, prompts, kind):
    s_head = PromptBuilder(other.tokenizer, "fewshot", 512).build(prompts[0].example).head_ids
    inner = TokenSelectPipeline(kind, 4, other.vocab_size, other, s_head)
    p = CrossModelPipeline(inner, other.tokenizer, tiny.tokenizer, "b")
    for pr in prompts[:4]:
        s_ids = context_token_ids(other.tokenizer, pr.context_text)
        kept = [s_ids[i] for i in inner.keep(s_ids)]
        assert len(kept) == budget(len(s_ids), 4)
        got = p.receive(p.payload(pr.context_ids, pr.context_text)).tolist()
        assert got == context_token_ids(tiny.tokenizer, ids_to_text(other.tokenizer, kept))
        assert max(got) < tiny.vocab_size


def test_sender_ids_are_read_as_the_receivers_own(tiny, other, prompts):
    p = SenderIdsPipeline(other.tokenizer, other.vocab_size, tiny.vocab_size, "b")
    pr = prompts[0]
    s_ids = torch.tensor(context_token_ids(other.tokenizer, pr.context_text))
    got = p.receive(p.payload(pr.context_ids, pr.context_text))
    assert torch.equal(got, s_ids % tiny.vocab_size)
    assert got.tolist() != pr.context_ids  # the sender's identities are not the receiver's tokens


def test_cross_pipelines_batched_equals_one_at_a_time(tiny, other, prompts):
    s_head = PromptBuilder(other.tokenizer, "fewshot", 512).build(prompts[0].example).head_ids
    inner = {p.name: p for k in ("truncate", "none") for p in build(k, BuildContext(other, s_head, ratio=2))}
    pipes = cross_pipelines(other, tiny, inner)
    assert set(pipes) == {"sender_ids", "truncate_r2", "none"}
    for p in pipes.values():
        batched = generate_predictions(tiny, prompts, p, batch_size=4, max_new_tokens=5, progress=False)
        alone = [generate_predictions(tiny, [pr], p, batch_size=1, max_new_tokens=5, progress=False,
                                      share_prefix=False)[0] for pr in prompts]
        assert batched == alone, p.name


def _pair_cfg(tmp_path, receiver, sender, name):
    c = RunConfig()
    c.model.model, c.model.sender_model = receiver, sender
    c.data.synthetic_articles, c.data.max_eval = 6, 8
    c.eval.stage1, c.eval.max_new_tokens, c.eval.n_boot, c.eval.ac_contexts = False, 4, 20, 0
    c.eval.sequence, c.eval.sequence_ratios = "truncate,surprisal,none", "2"
    c.out, c.progress = str(tmp_path / name), False
    return c


def test_one_sender_two_receivers_end_to_end(tmp_path):
    from latentwire.evaluation.run import run_experiment
    cross = run_experiment(_pair_cfg(tmp_path, "tiny-random", "tiny-random-b", "cross"), use_cache=False,
                           log=lambda *a: None)
    own = run_experiment(_pair_cfg(tmp_path, "tiny-random-b", "tiny-random-b", "own"), use_cache=False,
                         log=lambda *a: None)
    assert cross["sender_model"]["model"] == "tiny-random-b" and "sender_model" not in own
    assert "sender_ids" in cross["pipelines"] and "sender_ids" not in own["pipelines"]
    for name in ("truncate_r2", "surprisal_r2", "none"):
        a, b = cross["pipelines"][name]["wire"], own["pipelines"][name]["wire"]
        # the same payload (chosen on the sender's tokens) reaches both receivers: equal bytes
        assert a["bytes_mean"] == b["bytes_mean"], name
        assert a["sender"] == "tiny-random-b" and "sender" not in b
    assert (tmp_path / "cross" / "predictions_sender_ids.official.json").exists()


@pytest.mark.parametrize("change, flag", [({"stage1": True}, "--sender-model"),
                                          ({"sequence": "truncate,meanpool"}, "--sequence meanpool")])
def test_pair_rejects_what_cannot_cross(tmp_path, change, flag):
    c = _pair_cfg(tmp_path, "tiny-random", "tiny-random-b", "bad")
    for k, v in change.items():
        setattr(c.eval, k, v)
    with pytest.raises(LatentWireError, match=flag):
        c.validate()


def test_same_sender_and_receiver_is_not_a_pair(tmp_path):
    c = _pair_cfg(tmp_path, "tiny-random", "tiny-random", "same")
    c.eval.stage1 = True
    c.validate()  # the sender is the receiver: Stage 1 allowed
    assert not c.model.cross()


def _learned_cfg(tmp_path, receiver, sender, name, **seq):
    c = _pair_cfg(tmp_path, receiver, sender, name)
    c.eval.sequence, c.eval.sequence_ratios = "learned,truncate", "4"
    c.seq.seq_steps, c.seq.seq_batch, c.seq.seq_width, c.seq.seq_dim, c.seq.seq_max_questions = 3, 2, 16, 4, 6
    c.seq.seq_max_tokens = 1024
    for k, v in seq.items():
        setattr(c.seq, k, v)
    return c


def test_learned_wire_across_models_and_a_second_receiver(tmp_path):
    """One sender (tiny-random-b, width 96) trained with its own receiver; a
    second receiver (tiny-random, width 64, another vocabulary) loads that
    sender frozen and trains only its decoder: same payload bytes for both."""
    from latentwire.evaluation.run import run_experiment
    from latentwire.encoder.seqcomp import read_compressor_file
    first = run_experiment(_learned_cfg(tmp_path, "tiny-random-b", None, "first"), use_cache=False,
                           log=lambda *a: None)
    saved = tmp_path / "first" / "seq_compressor.pt"
    second = run_experiment(_learned_cfg(tmp_path, "tiny-random", "tiny-random-b", "second",
                                         seq_sender_path=str(saved)), use_cache=False, log=lambda *a: None)
    a, b = first["pipelines"]["learned_r4"]["wire"], second["pipelines"]["learned_r4"]["wire"]
    assert a["bytes_mean"] == b["bytes_mean"] and a["positions_mean"] == b["positions_mean"]
    assert b["sender"] == "tiny-random-b"
    s1 = read_compressor_file(saved)["state"]
    s2 = read_compressor_file(tmp_path / "second" / "seq_compressor.pt")["state"]
    enc = [k for k in s1 if k.startswith(("inp.", "layers.", "slot", "query", "code."))]
    assert enc and all(torch.equal(s1[k], s2[k]) for k in enc)  # the sender stayed frozen
    assert s1["dec.2.weight"].shape[0] == 96 and s2["dec.2.weight"].shape[0] == 64  # a decoder per receiver
    t = second["seq_train"]
    assert 0 < t["trained_params"] < t["params"]
    # a learned wire across models without a shared sender trains both halves
    joint = run_experiment(_learned_cfg(tmp_path, "tiny-random", "tiny-random-b", "joint"), use_cache=False,
                           log=lambda *a: None)
    assert joint["seq_train"]["trained_params"] == joint["seq_train"]["params"]


def test_shared_sender_is_checked(tmp_path):
    from latentwire.evaluation.run import run_experiment
    run_experiment(_learned_cfg(tmp_path, "tiny-random-b", None, "first"), use_cache=False, log=lambda *a: None)
    saved = str(tmp_path / "first" / "seq_compressor.pt")
    # the saved sender is tiny-random-b: another sender model is refused, naming the flag
    with pytest.raises(LatentWireError, match="--seq-sender-path .*sender"):
        run_experiment(_learned_cfg(tmp_path, "tiny-random-b", "tiny-random", "wrong", seq_sender_path=saved),
                       use_cache=False, log=lambda *a: None)
    with pytest.raises(LatentWireError, match="--seq-sender-path .*--seq-dim 8"):
        run_experiment(_learned_cfg(tmp_path, "tiny-random", "tiny-random-b", "shape", seq_sender_path=saved,
                                    seq_dim=8), use_cache=False, log=lambda *a: None)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LatentWireError, match="--seq-sender-path"):
        run_experiment(_learned_cfg(tmp_path, "tiny-random", "tiny-random-b", "bad", seq_sender_path=str(bad)),
                       use_cache=False, log=lambda *a: None)
