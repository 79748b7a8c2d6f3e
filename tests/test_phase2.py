import pytest
import torch

from latentwire.stage1.adapters import build_adapter
from latentwire.wire.compress import PCA
from latentwire.config import AdapterConfig, TrainConfig
from latentwire.data import PromptBuilder, synthetic_squad
from latentwire.evaluation.generate import EvalSwitches
from latentwire.stage1.train import phase2_batch, phase2_loss, train_phase2


@pytest.fixture(scope="module")
def setup(tiny):
    table = tiny.embedding_table()
    pca = PCA(16).fit(table)
    b = PromptBuilder(tiny.tokenizer, "plain", 160)
    prompts = [b.build(e) for e in synthetic_squad(4, seed=2)]
    return table, pca, prompts


def test_batch_alignment(tiny, setup):
    _, _, prompts = setup
    bt = phase2_batch(tiny, prompts[:3], EvalSwitches(keep_cue=True, scope="prompt"), tiny.tokenizer.pad_token_id)
    for i, p in enumerate(prompts[:3]):
        L = len(p.ids)
        lab = bt["labels"][i]
        assert (lab[:L - 1] == -100).all()
        ans = tiny.tokenizer.decode(bt["ids"][i, L:][bt["attn"][i, L:].bool()])
        assert ans.strip() == p.example.answers[0]
        assert lab[L - 1] == bt["ids"][i, L]  # logits at L-1 predict the first answer token
        assert not bt["recon"][i, L - p.n_cue:].any() and bt["recon"][i, :L - p.n_cue].all()
        assert not bt["recon"][i, L:].any()  # answer tokens stay original (teacher forcing)


def test_phase2_grads_reach_only_the_adapter(tiny, setup):
    table, pca, prompts = setup
    a = build_adapter(AdapterConfig(adapter="mlp"), pca, table)
    bt = phase2_batch(tiny, prompts[:2], EvalSwitches(), tiny.tokenizer.pad_token_id)
    terms = phase2_loss(tiny, a, pca.transform, bt, TrainConfig(w_kl=1.0, w_ce=1.0))
    assert {"ce", "kl", "cos_loss", "mse", "loss"} <= set(terms)
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())
    assert all(p.grad is None for p in tiny.model.parameters())


def test_kl_is_zero_for_a_perfect_reconstruction(tiny, setup):
    table, _, prompts = setup
    full = PCA(table.shape[1]).fit(table)  # lossless
    a = build_adapter(AdapterConfig(adapter="linear"), full, table)
    bt = phase2_batch(tiny, prompts[:2], EvalSwitches(), tiny.tokenizer.pad_token_id)
    terms = phase2_loss(tiny, a, full.transform, bt, TrainConfig())
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-4)


def test_train_phase2_logs_each_term(tiny, setup, tmp_path):
    table, pca, prompts = setup
    a = build_adapter(AdapterConfig(adapter="mlp"), pca, table)
    before = [p.detach().clone() for p in a.parameters()]
    out = train_phase2(tiny, a, pca.transform, prompts, EvalSwitches(), TrainConfig(phase2_steps=3, phase2_batch=2), tmp_path,
                       progress=False)
    assert out["phase2_steps"] == 3
    rows = [r for r in __import__("latentwire.util.runio", fromlist=["x"]).read_jsonl(tmp_path / "train_log.jsonl")]
    assert len(rows) == 3 and {"ce", "kl", "cos_loss", "mse", "loss", "lr"} <= set(rows[0])
    assert any(not torch.equal(b, p) for b, p in zip(before, a.parameters()))


def test_run_with_phase2(tmp_path):
    from latentwire.config import RunConfig
    from latentwire.evaluation.run import run_experiment
    c = RunConfig()
    c.model.model = "tiny-random"
    c.data.synthetic_articles, c.data.max_eval = 6, 4
    c.adapter.adapter = "mlp"
    c.train.epochs, c.train.steps_per_epoch, c.train.phase2_steps, c.train.phase2_batch = 1, 5, 2, 2
    c.eval.max_new_tokens, c.eval.n_boot, c.out, c.progress, c.controls = 4, 20, str(tmp_path / "r"), False, False
    m = run_experiment(c, use_cache=False, log=lambda *a: None)
    assert m["train"]["phase2_steps"] == 2 and m["train"]["phase2_last"]["ce"] > 0


def test_phase2_resume_is_bit_identical(tiny, setup, tmp_path):
    """Killed after step 3 with its last checkpoint at step 2: the resumed run
    redoes step 3 and ends with the weights and log of an uninterrupted run."""
    from latentwire.util.runio import read_jsonl
    table, pca, prompts = setup
    cfg = TrainConfig(phase2_steps=6, phase2_batch=2, phase2_ckpt_every=2)

    def fresh():
        torch.manual_seed(0)
        a = build_adapter(AdapterConfig(adapter="mlp", dropout=0.1), pca, table)  # dropout: the torch RNG matters
        torch.manual_seed(1)
        return a

    full = fresh()
    train_phase2(tiny, full, pca.transform, prompts, EvalSwitches(), cfg, tmp_path / "a", progress=False)
    part = fresh()
    out = train_phase2(tiny, part, pca.transform, prompts, EvalSwitches(), cfg, tmp_path / "b", progress=False, stop_after=3)
    assert out["stopped_early"] and torch.load(tmp_path / "b" / "ckpt_phase2.pt", weights_only=True)["step"] == 2
    resumed = fresh()
    torch.manual_seed(123)  # the resumed process starts with some other RNG state
    res = train_phase2(tiny, resumed, pca.transform, prompts, EvalSwitches(), cfg, tmp_path / "b", progress=False, resume=True)
    assert res["phase2_steps"] == 6
    for (n, p), (_, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n
    steps = [r for r in read_jsonl(tmp_path / "b" / "train_log.jsonl") if r.get("event") == "step2"]
    ref = [r for r in read_jsonl(tmp_path / "a" / "train_log.jsonl") if r.get("event") == "step2"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["loss"] for r in steps] == [r["loss"] for r in ref]
