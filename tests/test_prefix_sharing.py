"""Shared-prefix prefill (decode.prefix_tree / tree_generate, generate.plan_batches):
a prefix shared by several rows is prefilled once and its cache copied; the
answers must equal prefilling every row in full, and one question at a time."""
import pytest
import torch

from latentwire.data import PromptBuilder, synthetic_squad
from latentwire.llm.decode import (CacheNotCopyable, generate_one_at_a_time, greedy_generate, left_pad, prefix_tree,
                               stop_token_ids, tree_cost, tree_generate)
from latentwire.evaluation.generate import generate_predictions, plan_batches


def _prompts(tiny, template="fewshot"):
    # synthetic_squad asks 6-7 questions about each of 4 contexts
    b = PromptBuilder(tiny.tokenizer, template, 400)
    return [b.build(e) for e in synthetic_squad(4, seed=1)]


def _path(levels, i):
    """Row i rebuilt from the segments on its path from the root."""
    segs, node = [], i
    for lv in reversed(levels):
        segs.append(lv.segs[node])
        node = lv.parent[node]
    return torch.cat(segs[::-1])


def test_prefix_tree_splits_rows_into_common_group_and_own_parts():
    common, para_a, para_b = list(range(100, 120)), list(range(200, 240)), list(range(300, 330))
    rows = [torch.tensor(common + para_a + [1, 2, 3]), torch.tensor(common + para_b + [4]),
            torch.tensor(common + para_a + [5, 6]), torch.tensor(common + [7, 8])]
    levels = prefix_tree(rows, min_shared=16)
    assert [len(lv.segs) for lv in levels] == [1, 3, 4]
    assert levels[0].segs[0].tolist() == common
    # rows 0 and 2 share para_a: one group, its shared part computed once
    assert levels[2].parent[0] == levels[2].parent[2] != levels[2].parent[1]
    assert levels[1].segs[levels[2].parent[0]].tolist() == para_a
    for i, r in enumerate(rows):
        assert torch.equal(_path(levels, i), r)
        assert len(levels[2].segs[i]) >= 1  # every row's last token is computed in the last level
    assert tree_cost(levels) < len(rows) * max(map(len, rows))


def test_prefix_tree_compares_embeddings_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    y = x.clone()
    y[30, 0] += 1e-6  # differs in one number at position 30
    levels = prefix_tree([x, y], min_shared=4)
    assert len(levels[0].segs[0]) == 30
    for i, r in enumerate((x, y)):
        assert torch.equal(_path(levels, i), r)


def test_identical_rows_still_leave_a_token_for_the_last_level():
    r = torch.arange(50)
    levels = prefix_tree([r, r.clone(), r[:30]], min_shared=4)
    assert all(len(s) >= 1 for s in levels[2].segs)
    assert torch.equal(_path(levels, 2), r[:30])


def test_plan_batches_keeps_questions_on_one_context_together(tiny):
    prompts = _prompts(tiny)
    batches = plan_batches(prompts, batch_size=7)
    assert sorted(i for b in batches for i in b) == list(range(len(prompts)))
    ctx = [p.example.context for p in prompts]
    # 4 contexts x 6-7 questions, batches of 7: each batch spans at most 2 contexts
    assert all(len({ctx[i] for i in b}) <= 2 for b in batches)
    assert plan_batches(prompts, 7, share_prefix=False) != batches  # length order would mix contexts
    assert [len(prompts[i].ids) for b in plan_batches(prompts, 7, False) for i in b] == \
        sorted(len(p.ids) for p in prompts)


def test_tree_generate_equals_full_prefill_ids_and_embeds(tiny):
    prompts = _prompts(tiny)[:8]
    stops = stop_token_ids(tiny.tokenizer)
    ids, mask = left_pad([p.ids for p in prompts], tiny.tokenizer.pad_token_id)
    ref = greedy_generate(tiny.model, mask, input_ids=ids, max_new_tokens=8, stop_ids=stops)
    assert len({tuple(g) for g in ref}) > 1  # the tiny model answers differently per question
    rows = [torch.tensor(p.ids) for p in prompts]
    levels = prefix_tree(rows)
    assert len(levels[1].segs) < len(prompts) and len(levels[0].segs[0]) > 0  # sharing really happens
    got = tree_generate(tiny.model, levels, use_ids=True, pad_id=tiny.tokenizer.pad_token_id, max_new_tokens=8,
                        stop_ids=stops)
    assert got == ref
    emb_levels = prefix_tree([tiny.embed(r[None])[0] for r in rows])
    assert tree_generate(tiny.model, emb_levels, use_ids=False, max_new_tokens=8, stop_ids=stops) == ref


def test_shared_prefix_predictions_equal_unshared_and_one_at_a_time(tiny, monkeypatch):
    import latentwire.llm.decode as dec
    prompts = _prompts(tiny)
    calls = []
    real = dec.tree_generate
    monkeypatch.setattr(dec, "tree_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = generate_predictions(tiny, prompts, batch_size=8, max_new_tokens=8, progress=False)
    monkeypatch.setattr(dec, "tree_generate", real)
    plain = generate_predictions(tiny, prompts, batch_size=8, max_new_tokens=8, progress=False, share_prefix=False)
    single = generate_one_at_a_time(tiny, [p.ids for p in prompts], max_new_tokens=8, progress=False)
    assert shared == plain == single
    assert len(set(shared)) > 1
    assert len(calls) == 4  # every batch took the shared-prefix path
    # a reconstructed pipeline (row-wise transform): shared rows stay bit-identical, answers equal
    g = torch.Generator().manual_seed(0)
    W = torch.eye(tiny.d_model) + 0.05 * torch.randn(tiny.d_model, tiny.d_model, generator=g)
    a = generate_predictions(tiny, prompts, lambda x: x @ W, batch_size=8, max_new_tokens=8, progress=False)
    b = generate_predictions(tiny, prompts, lambda x: x @ W, batch_size=8, max_new_tokens=8, progress=False,
                             share_prefix=False)
    assert a == b


def test_sharded_batches_are_the_single_process_batches(tiny):
    prompts = _prompts(tiny)
    full = generate_predictions(tiny, prompts, batch_size=4, max_new_tokens=6, progress=False)
    parts = [generate_predictions(tiny, prompts, batch_size=4, max_new_tokens=6, progress=False, shard=(r, 3))
             for r in range(3)]
    merged = [next(p[i] for p in parts if p[i] is not None) for i in range(len(prompts))]
    assert merged == full


def _gemma(tiny, window: int):
    """Gemma 3 (sliding-window layers, scaled embeddings) wrapped like a loaded model."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from latentwire.llm.models import LoadedModel
    cfg = Gemma3TextConfig(vocab_size=len(tiny.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                           sliding_window=window, pad_token_id=tiny.tokenizer.pad_token_id)
    torch.manual_seed(0)
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        # as HF initialises it, the x8-scaled embedding of the last prompt token
        # (the cue, the same in every prompt) outweighs what attention adds, and
        # the model answers '::::' to everything; smaller embeddings, larger
        # layers make its answers depend on the prompt
        for w in m.parameters():
            if w.dim() > 1:
                w.normal_(0.0, 0.2)
        m.get_input_embeddings().weight.normal_(0.0, 0.02)
    return LoadedModel(m, tiny.tokenizer, "gemma3-tiny", "gemma3-tiny", torch.device("cpu"), torch.float32)


def test_sliding_window_model_shares_only_within_the_window(tiny, monkeypatch):
    """Sliding windows count cache columns, and the tree pads between levels:
    a batch whose tree is longer than the window is prefilled in full (with
    the tree, answers differ: checked by hand); inside the window the tree is
    exact, for Gemma 3's cache as for Llama's."""
    import latentwire.llm.decode as dec
    prompts = _prompts(tiny)[:12]
    real = dec.tree_generate
    for window, expect_tree in ((32, False), (1024, True)):
        lm = _gemma(tiny, window)
        calls = []
        monkeypatch.setattr(dec, "tree_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
        shared = generate_predictions(lm, prompts, batch_size=6, max_new_tokens=6, progress=False)
        monkeypatch.setattr(dec, "tree_generate", real)
        assert bool(calls) == expect_tree, window
        single = generate_one_at_a_time(lm, [p.ids for p in prompts], max_new_tokens=6, progress=False)
        assert shared == single
        assert len(set(single)) > 1


def test_a_cache_that_cannot_be_copied_falls_back_to_full_prefill(tiny, monkeypatch):
    """Warned about once; the run's later batches are prefilled in full without trying the tree again."""
    import latentwire.llm.decode as dec
    prompts = _prompts(tiny)[:8]
    ref = generate_predictions(tiny, prompts, batch_size=4, max_new_tokens=6, progress=False, share_prefix=False)
    tries = []

    def no_copy(*a, **k):
        tries.append(1)
        raise CacheNotCopyable("TestCache cannot be copied across rows")
    monkeypatch.setattr(dec, "tree_generate", no_copy)
    with pytest.warns(UserWarning, match="prefilling every row in full") as warned:
        assert generate_predictions(tiny, prompts, batch_size=4, max_new_tokens=6, progress=False) == ref
    assert len(tries) == 1 and len([w for w in warned if "prefilling" in str(w.message)]) == 1


def test_run_prefix_is_computed_once_and_answers_do_not_change(tiny, monkeypatch):
    from latentwire.llm.decode import RunPrefix
    prompts = _prompts(tiny)
    seen = []
    orig = RunPrefix.take

    def spy(self, seg):
        got = orig(self, seg)
        seen.append(got[1])
        return got

    monkeypatch.setattr(RunPrefix, "take", spy)
    with_run = generate_predictions(tiny, prompts, batch_size=4, max_new_tokens=6, progress=False)
    without = generate_predictions(tiny, prompts, batch_size=4, max_new_tokens=6, progress=False,
                                   run_prefix_cache=False)
    assert with_run == without
    shots = len(PromptBuilder(tiny.tokenizer, "fewshot", 512).prefix_ids)
    assert seen[0] == 0 and len(seen) > 2 and all(n >= shots for n in seen[1:])  # batches 2.. reuse batch 1's
