"""The frozen LLM: loading it from an alias, an HF id, a folder or a GGUF file (models.py), its forward over
[head][reading][tail] and K/V readings (forward.py), greedy decoding of ids, embeddings or K/V readings with
shared prefixes (decode.py), and the tiny random models behind `--model tiny-random` (tiny.py).

May import: latentwire.util, latentwire.data, latentwire.errors (tiny.py's synthetic corpus) -- nothing about
prompts' wire, pipelines or the evaluation.
Imported by: latentwire.wire and everything above it (pipelines, stage1, encoder, evaluation, api, cli).
"""
