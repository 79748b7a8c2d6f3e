import pytest
import torch

from latentwire.data import PromptBuilder, synthetic_squad
from latentwire.errors import LatentWireError
from latentwire.llm.decode import generate_one_at_a_time, generate_seed_loop, greedy_generate, left_pad, stop_token_ids
from latentwire.evaluation.generate import EvalSwitches, generate_predictions, pipeline_embeds
from latentwire.llm.models import (embedding_table, load_model, load_tokenizer, resolve_device, resolve_dtype,
                               resolve_model_source)


def test_tiny_model_is_frozen(tiny):
    assert not tiny.model.training
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert tiny.tokenizer.padding_side == "left"


def test_resolvers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"  # auto prefers CUDA when there is one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(LatentWireError, match="--device cuda:0: CUDA is not available"):
        resolve_device("cuda:0")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(LatentWireError, match="--dtype"):
        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.parametrize("name,msg", [
    ("./no/such/dir", "no such file or folder"),
    ("/nonexistent/model.gguf", "no such file or folder"),
])
def test_bad_model_names(name, msg):
    with pytest.raises(LatentWireError, match=msg):
        resolve_model_source(name)


def test_unknown_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LatentWireError, match="--model definitely-not-a-model-xyz"):
        load_model("definitely-not-a-model-xyz")


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """The same GGUF in two virtual environments shares one dequantized cache;
    a different or changed file gets its own."""
    import hashlib

    from latentwire.llm.models import _gguf_cache_dir, cache_root
    monkeypatch.setenv("LATENTWIRE_CACHE", str(tmp_path / "cache"))
    a, b, c = (tmp_path / d / "model.gguf" for d in ("venv1", "venv2", "other"))
    for f, data in ((a, b"GGUF same bytes"), (b, b"GGUF same bytes"), (c, b"GGUF other bytes")):
        f.parent.mkdir()
        f.write_bytes(data)
    assert _gguf_cache_dir(a) == _gguf_cache_dir(b) != _gguf_cache_dir(c)
    assert _gguf_cache_dir(a).name == "model-" + hashlib.sha256(b"GGUF same bytes").hexdigest()[:16]
    assert len(__import__("json").loads((cache_root() / "gguf" / "digests.json").read_text())) == 3
    a.write_bytes(b"GGUF other bytes, longer")  # changed in place: hashed again
    assert _gguf_cache_dir(a).name == "model-" + hashlib.sha256(b"GGUF other bytes, longer").hexdigest()[:16]


def test_folder_without_config(tmp_path):
    with pytest.raises(LatentWireError, match="no config.json"):
        resolve_model_source(str(tmp_path))


class ScaledEmbedding(torch.nn.Embedding):
    """Gemma-style: the module scales its output by sqrt(d)."""

    def forward(self, ids):
        return super().forward(ids) * (self.embedding_dim ** 0.5)


def test_embedding_table_goes_through_the_module(tiny):
    m = tiny.model
    orig = m.get_input_embeddings()
    scaled = ScaledEmbedding(orig.num_embeddings, orig.embedding_dim)
    scaled.weight.data.copy_(orig.weight.data)
    m.set_input_embeddings(scaled)
    try:
        t = embedding_table(m)
        assert torch.allclose(t, orig.weight * orig.embedding_dim ** 0.5)
        assert torch.allclose(tiny.embed(torch.tensor([3]))[0], t[3])
    finally:
        m.set_input_embeddings(orig)


def _prompts(tiny, n=6, template="fewshot"):
    b = PromptBuilder(tiny.tokenizer, template, 400)
    return [b.build(e) for e in synthetic_squad(4, seed=1)[:n]]


def test_ids_and_embeds_paths_give_identical_outputs(tiny):
    prompts = _prompts(tiny)
    stops = stop_token_ids(tiny.tokenizer)
    ids, mask = left_pad([p.ids for p in prompts], tiny.tokenizer.pad_token_id)
    a = greedy_generate(tiny.model, mask, input_ids=ids, max_new_tokens=8, stop_ids=stops)
    b = greedy_generate(tiny.model, mask, inputs_embeds=tiny.embed(ids), max_new_tokens=8, stop_ids=stops)
    assert a == b and any(len(x) for x in a)
    assert generate_predictions(tiny, prompts, use_input_ids=True, max_new_tokens=8, progress=False) == \
        generate_predictions(tiny, prompts, max_new_tokens=8, progress=False)


def test_batched_equals_one_at_a_time_despite_left_padding(tiny):
    prompts = _prompts(tiny)
    assert len({len(p.ids) for p in prompts}) > 1  # padding really happens
    batched = generate_predictions(tiny, prompts, batch_size=4, max_new_tokens=8, progress=False)
    single = generate_one_at_a_time(tiny, [p.ids for p in prompts], max_new_tokens=8, progress=False)
    assert batched == single


def test_identity_transform_equals_text_and_keep_mask(tiny):
    prompts = _prompts(tiny, 3)
    text = generate_predictions(tiny, prompts, max_new_tokens=6, progress=False)
    ident = generate_predictions(tiny, prompts, transform=lambda x: x, max_new_tokens=6, progress=False)
    assert text == ident
    # a transform that zeroes everything, with the cue kept: cue positions stay original
    sw = EvalSwitches(keep_bos=False, keep_prefix=0, keep_cue=True, scope="prompt")
    emb, mask = pipeline_embeds(tiny, prompts, lambda x: torch.zeros_like(x), sw, tiny.tokenizer.pad_token_id)
    n_cue = prompts[0].n_cue
    orig = tiny.embed(torch.tensor(prompts[0].ids[-n_cue:]))
    assert torch.allclose(emb[0, -n_cue:], orig)
    assert emb[0, -n_cue - 1].abs().sum() == 0


def test_stop_ids_include_newline_tokens_and_eos(tiny):
    s = set(stop_token_ids(tiny.tokenizer))
    assert tiny.tokenizer.eos_token_id in s
    nl = tiny.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert set(nl) & s


def test_gemma_style_scaled_embeddings_end_to_end(tiny):
    """Gemma 3 scales inside its embedding module: the table we compress and
    the embeds we feed must be the module's output, and then the ids path and
    the embeds path agree."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(vocab_size=len(tiny.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           sliding_window=64, pad_token_id=tiny.tokenizer.pad_token_id)
    torch.manual_seed(0)
    m = Gemma3ForCausalLM(cfg).eval()
    table = embedding_table(m)
    assert torch.allclose(table, m.get_input_embeddings().weight * 8.0)
    prompts = _prompts(tiny, 3, "plain")
    stops = stop_token_ids(tiny.tokenizer)
    ids, mask = left_pad([p.ids for p in prompts], tiny.tokenizer.pad_token_id)
    a = greedy_generate(m, mask, input_ids=ids, max_new_tokens=5, stop_ids=stops)
    b = greedy_generate(m, mask, inputs_embeds=m.get_input_embeddings()(ids), max_new_tokens=5, stop_ids=stops)
    assert a == b


def test_local_folder_model_loads(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.source == str(tmp_path) and lm.d_model == tiny.d_model
    prompts = _prompts(tiny, 2)
    assert generate_predictions(lm, prompts, max_new_tokens=5, progress=False) == \
        generate_predictions(tiny, prompts, max_new_tokens=5, progress=False)
    # the tokenizer alone, without the weights: the same ids, padding side and pad token as load_model's
    text = " The clock tower was built in 1901 by Ada."
    for name in (str(tmp_path), "tiny-random-b"):
        full, alone = load_model(name).tokenizer, load_tokenizer(name)
        assert alone(text)["input_ids"] == full(text)["input_ids"]
        assert alone.padding_side == full.padding_side == "left"
        assert alone.pad_token_id == full.pad_token_id is not None
    with pytest.raises(LatentWireError, match="--model ./nope"):
        load_tokenizer("./nope")


def test_seed_loop_gives_the_batched_answers(tiny):
    """The seed's evaluation (one `model.generate` call per question, no stop
    at the newline, cut afterwards) answers exactly as our batched loop does,
    so the throughput benchmark compares equal work."""
    b = PromptBuilder(tiny.tokenizer, "fewshot", 256)
    prompts = [b.build(e) for e in synthetic_squad(6, 1)[:6]]
    batched = generate_predictions(tiny, prompts, batch_size=3, max_new_tokens=6, progress=False)
    assert generate_seed_loop(tiny, [p.ids for p in prompts], max_new_tokens=6, progress=False) == batched
    assert len(set(batched)) > 1


def test_display_name_drops_the_cache_folder_of_a_gguf():
    from latentwire.llm.models import display_name
    assert display_name("/root/.cache/latentwire/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f") == \
        "SmolLM2-135M-Instruct.Q4_1"
    assert display_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert display_name("/models/my-model-0123456789abcdef") == "/models/my-model-0123456789abcdef"  # not the cache


def test_decoding_imports_no_prompts_or_pipelines():
    """decode.py knows tensors only: imported alone (the package's own __init__, which loads the API, left out),
    it brings in no prompt, pipeline, wire or evaluation module."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, types; pkg = types.ModuleType('latentwire'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['latentwire'] = pkg; import latentwire.llm.decode; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('latentwire.'))))")
    here = str(Path(__file__).resolve().parents[1] / "latentwire")
    out = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True, check=True).stdout.split()
    assert set(out) <= {"latentwire.llm", "latentwire.llm.decode", "latentwire.errors", "latentwire.llm.forward", "latentwire.llm.models"}, out


def test_an_empty_cache_variable_means_the_default_folder(monkeypatch, tmp_path):
    from pathlib import Path

    from latentwire.llm.models import cache_root
    monkeypatch.setenv("LATENTWIRE_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "latentwire"
    monkeypatch.setenv("LATENTWIRE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
