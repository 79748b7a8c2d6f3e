"""The built-in smoke model: a tiny random-weight causal LM with a real
byte-level BPE tokenizer, built in-process in a fraction of a second, for
`--model tiny-random` (and `tiny-random-b`, another vocabulary and width,
for sender/receiver pairs). It lets any command run end to end in seconds
on any machine -- `scripts/gpu_check.sh` checks a device with it -- and it
never touches the network. Its answers are noise: never a result. The
test-suite uses it through the same aliases (tests/conftest.py), so that
processes the tests start (torchrun, kills, the benchmark scripts) resolve
it as a user's command would.
"""
from __future__ import annotations

import torch
from ..data import synthetic_corpus_text


def tiny_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast


    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(synthetic_corpus_text(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def tiny_model_and_tokenizer(seed: int = 0, hidden_size: int = 64, layers: int = 2, init_std: float = 0.2,
                             vocab_size: int = 384):
    """`vocab_size`: of the BPE tokenizer (its merges differ with it, so two
    sizes tokenize one text differently: a second model for the pair tests).
    init_std 0.2 rather than HF's 0.02: at 0.02 a 2-layer random model says
    the same thing ('::::') to every prompt, so equal-outputs tests would
    prove nothing; at 0.2 its answers differ from question to question."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                      initializer_range=init_std)
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.eval()
    return model, tok
