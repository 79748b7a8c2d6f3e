"""The Python API: a pipeline from a name or a run folder, its payload for a
paragraph, a frozen LLM's answer from a payload, and the evaluation of any
pipelines -- the same code paths as `latentwire send`, `ask` and `run`.

    import latentwire as lw
    pipe = lw.load_pipeline("truncate+ac", ratio=4)          # SmolLM2-135M-Instruct, offline
    payload = pipe.send(open("paragraph.txt").read())          # bytes (a latentwire.Payload)
    print(len(payload), "bytes,", payload.positions, "positions")
    print(lw.ask(pipe, payload, "Who founded the company?"))  # the evaluation's prompt and decoding
    open("p.bin", "wb").write(lw.wrap(pipe, payload))         # a payload file: the payload in its 8-byte frame
    print(lw.ask(pipe, open("p.bin", "rb").read(), "Who founded the company?"))  # checked against the frame
    metrics = lw.evaluate([pipe, lw.load_pipeline("none", lm=pipe.lm)], "dev-v1.1-part-a.json", max_eval=100)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .config import RunConfig
from .data import Example, PromptBuilder
from .errors import LatentWireError
from .pipelines import BuildContext, Pipeline, build, run_dir_kind

# The models, the frame, the generation and the run are imported inside the functions that use them, so that
# `import latentwire` loads only the registry and the wire (start-up time).


def _builder(lm, cfg: RunConfig) -> PromptBuilder:
    return PromptBuilder(lm.tokenizer, cfg.data.template, cfg.data.max_prompt_tokens, cfg.data.bos != "none")


def head_ids(builder: PromptBuilder) -> list[int]:
    """The receiver's prompt before the context (BOS, shots, 'Context:')."""
    p = builder.build(Example("head", "head", "", "?", ["-"]))
    return p.ids[:p.ctx_start]


def load_pipeline(spec: str = "text", model: str | None = None, ratio: float = 4.0, *, lm=None,
                  options: dict | None = None, out: str | Path | None = None, device: str = "auto",
                  dtype: str = "auto", flag: str = "--pipeline", codec_model=None) -> Pipeline:
    """A pipeline by kind (`latentwire pipelines`), run folder or `package.module:Factory`, with its receiver
    model loaded (or `lm`, a model loaded before: pipelines that share it are compared on one receiver).

    `model`: the receiving LLM (an alias, a HF id, a folder, a .gguf); default: the run folder's model, else
    smollm2-135m. `ratio`: r for kinds that compress the sequence. `options`: config fields by name (e.g.
    {"opt_steps": 20, "template": "fewshot"}), as in a sweep file. `out`: a folder where per-paragraph fits
    are kept (opt-* kinds). `codec_model`: the LLM that codes `ac`, `truncate+ac`, `surprisal+ac` (a name as
    for `model`, or a loaded model; default: the receiver). The pipeline carries what `ask` needs: `.lm` and
    `.builder`."""
    from .llm.models import DEFAULT_MODEL, load_model
    from .evaluation.sweep import apply_overrides
    cfg = RunConfig()
    if Path(spec).is_dir() and run_dir_kind(Path(spec)) is not None and (Path(spec) / "config.json").is_file():
        saved = json.loads((Path(spec) / "config.json").read_text())
        model = model or saved.get("model", {}).get("model")
        cfg.data.template = saved.get("data", {}).get("template", cfg.data.template)
    if options:
        cfg = apply_overrides(cfg, options, where="options")  # a copy: its return value is the config
    cfg.validate()
    if lm is None:
        lm = load_model(model or DEFAULT_MODEL, device, dtype)
    elif model is not None and model not in (lm.name, lm.source):
        raise LatentWireError(f"--model {model}: the pipeline was given another loaded model ({lm.name})")
    builder = _builder(lm, cfg)
    codec = load_codec(codec_model, lm, device, dtype)
    ctx = BuildContext(lm=lm, head_ids=head_ids(builder), ratio=ratio, cfg=cfg, out=None if out is None else Path(out),
                       extra={"builder": builder}, codec=codec,
                       codec_head_ids=None if codec is None else head_ids(_builder(codec, cfg)))
    pipe = build(spec, ctx, flag=flag)[0]
    pipe.builder = builder
    if Path(spec).is_dir() and getattr(pipe, "weights_digest", None) is None:
        from .pipelines.frame import RUN_WEIGHT_FILES, files_digest
        pipe.weights_digest = files_digest(Path(spec) / f for f in RUN_WEIGHT_FILES)
    return pipe


def load_codec(codec_model, lm, device: str = "auto", dtype: str = "auto"):
    """The codec model (`--codec-model`: a name, or a loaded model), or None when it is the receiver `lm`."""
    if codec_model is None or codec_model is lm or codec_model in (lm.name, lm.source):
        return None
    if isinstance(codec_model, str):
        from .llm.models import load_model
        return load_model(codec_model, device, dtype)
    return codec_model


def wrap(pipeline: Pipeline, payload: bytes) -> bytes:
    """A payload in its frame (latentwire/pipelines/frame.py): what a payload file holds, `frame.FRAME_BYTES` more."""
    from .pipelines.frame import wrap as _wrap
    return _wrap(pipeline, payload)


def unwrap(pipeline: Pipeline, data: bytes, where: str = "payload") -> "Payload":
    """The payload of framed bytes, checked against `pipeline` (one-line LatentWireError naming both sides)."""
    from .pipelines.frame import unwrap as _unwrap
    return _unwrap(pipeline, data, where)


def ask(pipeline: Pipeline, payload: bytes, question: str, *, max_new_tokens: int = 16,
        where: str = "payload") -> str:
    """The receiver's answer to `question` from a payload: the evaluation's prompt (its template, the payload's
    reading where the context goes) and its greedy decoding. `payload`: a `Payload` as `pipeline.send` gives
    it, or the bytes of a payload file (framed: checked against this pipeline first, see `unwrap`)."""
    from .evaluation.generate import answer
    from .wire.wire import IntegrityError, Payload
    framed = not isinstance(payload, Payload)
    if framed:
        payload = unwrap(pipeline, payload, where)
    lm = pipeline.lm
    builder = getattr(pipeline, "builder", None) or PromptBuilder(lm.tokenizer, "fewshot")
    prompt = builder.build(Example("ask", "ask", "", question, ["-"]))
    try:
        return answer(lm, prompt, pipeline, bytes(payload), max_new_tokens)
    except IntegrityError as e:
        if not framed:
            raise
        raise IntegrityError(f"{where}: {e} -- its frame's checksum and model fingerprints match, so the same model "
                             "files computed other numbers here (thread count, lane width, dtype, device or library "
                             "versions)") from None


def evaluate(pipelines: Sequence[Pipeline], squad_path: str | None = None, *, max_eval: int = 200,
             max_eval_contexts: int = 0, out: str | Path = "runs/evaluate", seed: int = 0, overwrite: bool = True,
             log=print) -> dict:
    """Score pipeline objects (any that implement the sender/receiver interface, on one receiver model) on
    SQuAD questions (`squad_path`: an official JSON file; None: the built-in synthetic set's evaluation
    articles) through the same evaluation, controls and report as `latentwire run`; returns metrics.json's
    content and writes the run folder `out`."""
    from .evaluation.run import evaluate_run
    pipes = list(pipelines)
    if not pipes:
        raise LatentWireError("evaluate: no pipelines given")
    lm = pipes[0].lm
    if any(p.lm is not lm for p in pipes):
        raise LatentWireError("evaluate: every pipeline must read with the same loaded receiver model "
                              "(load_pipeline(..., lm=first.lm))")
    cfg = RunConfig()
    cfg.model.model = lm.name
    cfg.data.squad_eval, cfg.data.max_eval, cfg.data.max_eval_contexts, cfg.data.seed = \
        squad_path, max_eval, max_eval_contexts, seed
    cfg.eval.stage1 = False  # the pipelines are given: metrics.json "pipelines_given" describes them
    cfg.out, cfg.progress = str(out), False
    builder = getattr(pipes[0], "builder", None)
    if builder is not None:
        cfg.data.template = builder.template
    return evaluate_run(cfg, lm, pipes, overwrite=overwrite, log=log)


__all__ = ["ask", "evaluate", "head_ids", "load_codec", "load_pipeline", "unwrap", "wrap"]
