"""Typed configuration. One dataclass per stage; each field documents itself
and is validated up front by `validate()`, with errors that name the CLI flag.
The resolved config is saved next to every artifact (`config.json`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import LatentWireError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise LatentWireError(f"{_flag(name)}: {value!r} is not one of {', '.join(map(str, choices))}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        raise LatentWireError(f"{_flag(name)} must be {'>= 0' if allow_zero else '> 0'} (got {value})")


@dataclass
class ModelConfig:
    model: str = "smollm2-135m"
    """HF hub id, local model folder, .gguf file, or an alias: smollm2-135m (default), gemma3-270m (after
    `bash scripts/setup.sh --gemma`), tiny-random, tiny-random-b (another vocabulary and width)."""
    sender_model: str | None = None
    """The model on the sending side, when it is not --model (the receiver: the LLM that reads the wire and
    answers). Same forms as --model. Token pipelines (truncate, surprisal, none) are then chosen on the sender's
    tokens and reach the receiver as text, re-tokenized by it; a `sender_ids` row shows what a per-token code
    (Stage 1) would deliver: the sender's token ids read as the receiver's own; the learned wire encodes the
    sender's hidden states and decodes into the receiver's embedding space (--seq-sender-path: a sender trained
    before, frozen). Default: --model."""
    codec_model: str | None = None
    """The LLM that arithmetic-codes the LLM-coded kinds (ac, truncate+ac, surprisal+ac), when it is not --model:
    a small model both ends hold, like a shared dictionary. It codes the paragraph in its own tokens; the
    receiving side decodes them with it and the receiver LLM reads their text (payloads then serve any
    receiver). Same forms as --model. Default: --model (the receiver's own code)."""
    device: str = "auto"
    """auto (cuda -> mps -> cpu), or a torch device string."""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16."""
    device_map: str | None = None
    """Spread one large model over several GPUs (and CPU) in one process, e.g. 'auto' (Accelerate's
    placement; weights are loaded shard by shard). Not with torchrun/accelerate launch (one GPU per process)."""

    def cross(self) -> bool:
        """True when the sender is another model than the receiver."""
        return self.sender_model is not None and self.sender_model != self.model

    def validate(self) -> None:
        if self.device_map is not None:
            _choice("device_map", self.device_map, ("auto", "balanced", "balanced_low_0", "sequential"))


@dataclass
class DataConfig:
    squad_train: str | None = None
    """Official SQuAD JSON used to fit the compressor and train the adapter; 'hub' for the HF hub."""
    squad_eval: str | None = None
    """Official SQuAD JSON for evaluation (articles disjoint from training); 'hub' for the HF hub."""
    synthetic_articles: int = 120
    """Articles of the built-in synthetic QA set, used when no SQuAD path is given."""
    eval_fraction: float = 0.5
    """Share of articles held out for evaluation when one source is split (synthetic)."""
    template: str = "fewshot"
    """Prompt template: plain | fewshot | chat."""
    max_prompt_tokens: int = 512
    """Token budget per prompt; only the context is shortened to fit."""
    bos: str = "none"
    """none: no BOS token; original: prepend BOS, keep its original embedding;
    reconstructed: prepend BOS and send it through the compressor too."""
    max_eval: int = 200
    """Evaluation questions (round-robin over articles); 0 = all."""
    max_eval_contexts: int = 0
    """Evaluate on the first N paragraphs (articles round-robin) and every question on them (then --max-eval, if
    not 0, caps the questions); 0 = no paragraph limit."""
    max_train_questions: int = 0
    """Training questions whose prompts feed PCA fitting and the token pool; 0 = all."""
    seed: int = 0
    """Seed for splits, sampling, initialisation and bootstrap."""

    def validate(self, need_train: bool = True) -> None:
        _choice("template", self.template, ("plain", "fewshot", "chat"))
        _choice("bos", self.bos, ("none", "original", "reconstructed"))
        _positive("max_prompt_tokens", self.max_prompt_tokens)
        _positive("max_eval", self.max_eval, allow_zero=True)
        _positive("max_eval_contexts", self.max_eval_contexts, allow_zero=True)
        _positive("max_train_questions", self.max_train_questions, allow_zero=True)
        _positive("synthetic_articles", self.synthetic_articles)
        if self.synthetic_articles < 2:
            raise LatentWireError("--synthetic-articles must be >= 2 (one train and one eval article)")
        if not 0.0 < self.eval_fraction < 1.0:
            raise LatentWireError(f"--eval-fraction must be in (0, 1) (got {self.eval_fraction})")
        for name in ("squad_train", "squad_eval"):
            v = getattr(self, name)
            if v is not None and v != "hub" and not Path(v).is_file():
                raise LatentWireError(f"{_flag(name)} {v}: no such file")
        if need_train and (self.squad_train is None) != (self.squad_eval is None):
            raise LatentWireError("--squad-train and --squad-eval go together (train and evaluate on disjoint files)")
        if self.squad_train is not None and self.squad_train != "hub" and self.squad_train == self.squad_eval:
            raise LatentWireError("--squad-train and --squad-eval are the same file; evaluation articles must be unseen")


@dataclass
class EvalConfig:
    batch_size: int = 8
    """Questions per generation batch (left-padded)."""
    max_new_tokens: int = 16
    """Greedy decoding stops at EOS, a newline, or this many tokens."""
    wire_scope: str = "context"
    """What crosses the wire: context (the paragraph only; shots, question and answer cue stay the receiver's
    own text) | prompt (every prompt position but the kept BOS/--keep-prefix/answer cue: the seed's setting)."""
    lm_code_length: bool = True
    """Report the frozen LLM's code length of each context (sum -log2 p): the lossless floor of the text wire."""
    ac_contexts: int = 4
    """Contexts whose LLM arithmetic coding is run for real (encode + decode, one LLM step a token each way)
    to report its actual bytes beside the bound; 0 = the bound only."""
    sequence: str = ""
    """Sequence compressors to evaluate beside Stage 1, comma-separated, each at every --sequence-ratios r (M =
    ceil(context tokens / r)): truncate, surprisal, meanpool, their +ac forms (ids arithmetic-coded with the LLM),
    none (nothing sent), opt-{emb,kv}-{copy,use} (the per-paragraph ceiling, --opt-* flags), learned (the trained
    compressor, --seq-* flags; trained in the run unless --seq-path is given). `latentwire pipelines` lists them."""
    sequence_ratios: str = "4"
    """Comma-separated ratios r for --sequence (e.g. 2,4,8,16)."""
    pipeline: str = ""
    """More pipelines, comma-separated: a kind (`latentwire pipelines`; e.g. ac, truncate+ac -- kinds that take a
    ratio are built at every --sequence-ratios r, or at one with KIND@r, e.g. surprisal+ac@4), a run folder (its
    trained pipeline), or package.module:Factory (your own; imported from the working directory or the Python
    path)."""
    probe_contexts: int = 32
    """Evaluation paragraphs on which a learned pipeline's reading is probed without questions (reconstruction,
    continuation), beside its controls; 0 = skip."""
    stage1: bool = True
    """Fit, train and evaluate the Stage 1 pipelines (PCA + adapter, and the linear control). --no-stage1:
    only the text baseline and the --sequence pipelines (nothing is fitted or trained for Stage 1)."""
    share_prefix: bool = True
    """Prefill a prompt prefix shared by several questions of a batch (few-shot shots, one paragraph's
    questions) once and copy its key/value cache; same answers up to float rounding, several times
    less prefill. Off: every question is prefilled in full."""
    anchor: str = "original"
    """The answer cue ('\\nAnswer:'): original embeddings (an anchor) or reconstructed."""
    keep_prefix: int = 0
    """Keep this many leading prompt tokens (after BOS) as original embeddings."""
    vocab_metrics: str = "auto"
    """Whole-vocabulary token recovery of each Stage 1 pipeline: full (every id, once: V x V comparisons,
    ~1 min for a 49k vocabulary on 2 CPU cores) | sample (8,192 random ids, with a 95% interval) | auto (full up
    to 65,536 ids, else sample)."""
    diagnostics_k: int = 10
    """Examples shown token by token in the diagnostics."""
    n_boot: int = 1000
    """Bootstrap resamples for 95% intervals over questions."""

    def sequence_kinds(self) -> list[str]:
        return [k.strip() for k in self.sequence.split(",") if k.strip()]

    def pipeline_specs(self) -> list[str]:
        return [k.strip() for k in self.pipeline.split(",") if k.strip()]

    def sequence_ratio_list(self) -> list[float]:
        try:
            return [float(r) for r in self.sequence_ratios.split(",") if r.strip()]
        except ValueError:
            raise LatentWireError(f"--sequence-ratios {self.sequence_ratios!r}: expected numbers like 2,4,8") from None

    def validate(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("max_new_tokens", self.max_new_tokens)
        _choice("anchor", self.anchor, ("original", "reconstructed"))
        _choice("wire_scope", self.wire_scope, ("context", "prompt"))
        _choice("vocab_metrics", self.vocab_metrics, ("auto", "full", "sample"))
        _positive("keep_prefix", self.keep_prefix, allow_zero=True)
        _positive("ac_contexts", self.ac_contexts, allow_zero=True)
        from .pipelines import KINDS, is_plugin
        if not self.stage1 and not self.sequence_kinds() and not self.pipeline_specs():
            raise LatentWireError("--no-stage1 leaves nothing to evaluate but the text: add --sequence or --pipeline")
        ratio_kinds = [k for k, v in KINDS.items() if v.ratio or k in ("none",)] + ["learned"]
        for k in self.sequence_kinds():
            _choice("sequence", k, ratio_kinds)
        for spec in self.pipeline_specs():
            kind, at, r = spec.partition("@")
            if at:
                if kind not in KINDS or not KINDS[kind].ratio:
                    raise LatentWireError(f"--pipeline {spec}: KIND@r needs a kind that takes a ratio")
                try:
                    if not float(r) >= 1:
                        raise ValueError
                except ValueError:
                    raise LatentWireError(f"--pipeline {spec}: the ratio after @ must be a number >= 1") from None
                continue
            if spec not in KINDS and not Path(spec).is_dir() and not is_plugin(spec):
                raise LatentWireError(f"--pipeline {spec}: not a pipeline kind ({', '.join(KINDS)}), a run folder, "
                                      "or package.module:Factory")
        _positive("probe_contexts", self.probe_contexts, allow_zero=True)
        for r in self.sequence_ratio_list():
            if not r >= 1:
                raise LatentWireError(f"--sequence-ratios: each ratio must be >= 1 (got {r:g})")
            if "meanpool" in self.sequence_kinds() and r != int(r):
                raise LatentWireError(f"--sequence-ratios {r:g}: meanpool needs integer ratios")
        if self.wire_scope == "context":
            if self.anchor == "reconstructed":
                raise LatentWireError("--anchor reconstructed needs --wire-scope prompt (with --wire-scope context "
                                      "only the context crosses the wire; the answer cue is always text)")
            if self.keep_prefix:
                raise LatentWireError("--keep-prefix needs --wire-scope prompt (with --wire-scope context the prompt "
                                      "before the context is always text)")
        _positive("diagnostics_k", self.diagnostics_k, allow_zero=True)
        _positive("n_boot", self.n_boot)


@dataclass
class CompressConfig:
    compressor: str = "pca"
    """pca | random (Gaussian random projection) | identity (control)."""
    compress_dim: int | None = None
    """Compressed width k; default d_model / ratio."""
    ratio: float = 4.0
    """Compression ratio d_model / k, used when --compress-dim is not given."""
    bits: int = 32
    """Bits per code dimension on the wire: 32 (fp32), 16 (fp16), or 1..8 (per-dimension scalar quantization
    whose levels are fitted on training tokens and shared by both ends, not sent)."""
    quantizer: str = "lloyd"
    """Scalar quantizer for --bits 1..8: lloyd (Lloyd-Max levels per dimension) | uniform (evenly spaced over
    the 0.1-99.9% quantile range)."""
    fit_source: str = "corpus"
    """What PCA is fitted on: corpus (training-prompt tokens, streamed) | vocab (the table, uniform)."""
    compressor_path: str | None = None
    """Load this fitted compressor (a run's compressor.pt) instead of fitting one; checked against the model."""

    def validate(self, d_model: int | None = None) -> None:
        _choice("compressor", self.compressor, ("pca", "random", "identity"))
        _choice("fit_source", self.fit_source, ("corpus", "vocab"))
        _choice("quantizer", self.quantizer, ("lloyd", "uniform"))
        if self.bits not in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32):
            raise LatentWireError(f"--bits {self.bits}: choose 32 or 16 (floats) or 1..8 (scalar quantization)")
        if self.compress_dim is not None:
            _positive("compress_dim", self.compress_dim)
        _positive("ratio", self.ratio)
        if self.compressor_path is not None and not Path(self.compressor_path).is_file():
            raise LatentWireError(f"--compressor-path {self.compressor_path}: no such file")
        if self.ratio < 1:
            raise LatentWireError(f"--ratio must be >= 1 (got {self.ratio})")
        if d_model is not None:
            k = self.resolve_dim(d_model)
            if self.compressor != "identity" and not 1 <= k <= d_model:
                raise LatentWireError(f"--compress-dim {k} must be between 1 and d_model={d_model}")

    def resolve_dim(self, d_model: int) -> int:
        if self.compressor == "identity":
            return d_model
        if self.compress_dim is not None:
            return self.compress_dim
        if self.ratio > d_model:
            raise LatentWireError(f"--ratio {self.ratio} exceeds d_model={d_model} (it would leave less than one "
                                  f"dimension); use --compress-dim 1..{d_model}")
        return max(1, round(d_model / self.ratio))


@dataclass
class AdapterConfig:
    adapter: str = "vocab"
    """vocab (soft nearest-neighbour decoder over the receiver's embedding table) | mlp | linear (PCA inverse, untrained)."""
    preset: str = "none"
    """none, or 'seed': the seed's MLP (output LayerNorm, hidden_mult 4, dropout 0.1, 0.1*MSE + cosine, the whole
    prompt reconstructed). The preset is applied first; flags given explicitly override it."""
    hidden_mult: int = 4
    """MLP hidden width = compress_dim * hidden_mult."""
    dropout: float = 0.0
    """MLP dropout."""
    residual: bool = True
    """MLP: add a linear skip path k -> d (initialised from the PCA inverse when --init-pca)."""
    init_pca: bool = True
    """MLP: initialise the skip path as the PCA inverse (only with --compressor pca)."""
    input_norm: bool = True
    """MLP: LayerNorm on the compressed input."""
    output_norm: bool = False
    """MLP: LayerNorm on the output (the seed's choice; destroys the embedding scale)."""
    calibration: str = "rms"
    """Output calibration: none | rms (per-token RMS set to the embedding table's mean RMS) | learned (learned scale)."""
    vocab_topk: int = 64
    """vocab: candidates per token (exact nearest in compressed space) the softmax runs over."""
    adapter_path: str | None = None
    """Load these trained adapter weights (a run's adapter.pt) instead of training; checked against the run."""

    def validate(self) -> None:
        _choice("adapter", self.adapter, ("vocab", "mlp", "linear"))
        _choice("preset", self.preset, ("none", "seed"))
        _choice("calibration", self.calibration, ("none", "rms", "learned"))
        _positive("hidden_mult", self.hidden_mult)
        _positive("vocab_topk", self.vocab_topk)
        if not 0.0 <= self.dropout < 1.0:
            raise LatentWireError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.adapter_path is not None and not Path(self.adapter_path).is_file():
            raise LatentWireError(f"--adapter-path {self.adapter_path}: no such file")


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over the training token pool (corpus tokens + vocabulary rows)."""
    steps_per_epoch: int | None = None
    """Optimizer steps per epoch; default 300 for mlp, 20 for vocab (it learns only a temperature)."""
    batch_tokens: int | None = None
    """Token vectors per step; default 1024 for mlp/linear, 256 for vocab (it learns one temperature)."""
    vocab_fraction: float = 0.5
    """Share of each batch drawn uniformly from the whole vocabulary (so unseen tokens reconstruct)."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    w_cos: float = 1.0
    """Weight of (1 - cosine) in the reconstruction loss."""
    w_mse: float = 1.0
    """Weight of MSE in the reconstruction loss."""
    eval_every: int = 100
    """Quick evaluation (fixed token set) every N steps."""
    ckpt_every: int = 100
    """Checkpoint every N steps (atomic)."""
    phase2_steps: int = 0
    """Phase 2 (generation-aware) steps after Phase 1, through the frozen LLM; 0 = Phase 1 only."""
    phase2_batch: int = 4
    """Phase 2: training questions per step."""
    phase2_max_tokens: int = 256
    """Phase 2: token budget of a training prompt (context shortened to fit)."""
    phase2_lr: float = 1e-3
    """Phase 2: AdamW learning rate (constant after a 10-step warm-up)."""
    phase2_ckpt_every: int = 10
    """Phase 2: checkpoint every N steps (atomic; a step runs the LLM forward and backward)."""
    w_ce: float = 1.0
    """Phase 2: weight of teacher-forced cross-entropy on the gold answer tokens."""
    w_kl: float = 1.0
    """Phase 2: weight of KL(original || reconstructed) next-token distributions."""
    kl_positions: str = "both"
    """Phase 2: where the KL is taken: prompt | answer | both."""
    kl_temperature: float = 1.0
    """Phase 2: softmax temperature of the KL term."""

    def validate(self) -> None:
        for n in ("epochs", "eval_every", "ckpt_every"):
            _positive(n, getattr(self, n))
        if self.steps_per_epoch is not None:
            _positive("steps_per_epoch", self.steps_per_epoch)
        if self.batch_tokens is not None:
            _positive("batch_tokens", self.batch_tokens)
        for n in ("warmup_steps", "weight_decay", "grad_clip", "w_cos", "w_mse"):
            _positive(n, getattr(self, n), allow_zero=True)
        _positive("lr", self.lr)
        _positive("phase2_steps", self.phase2_steps, allow_zero=True)
        for n in ("phase2_batch", "phase2_max_tokens", "phase2_lr", "phase2_ckpt_every", "kl_temperature"):
            _positive(n, getattr(self, n))
        for n in ("w_ce", "w_kl"):
            _positive(n, getattr(self, n), allow_zero=True)
        _choice("kl_positions", self.kl_positions, ("prompt", "answer", "both"))
        if self.phase2_steps and self.w_ce == 0 and self.w_kl == 0 and self.w_cos == 0 and self.w_mse == 0:
            raise LatentWireError("--phase2-steps > 0 but --w-ce, --w-kl, --w-cos and --w-mse are all 0")
        if not 0.0 <= self.vocab_fraction <= 1.0:
            raise LatentWireError(f"--vocab-fraction must be in [0, 1] (got {self.vocab_fraction})")
        if self.w_cos == 0 and self.w_mse == 0:
            raise LatentWireError("--w-cos and --w-mse are both 0: there is nothing to train")


@dataclass
class SeqConfig:
    """The learned sequence compressor (`--sequence learned`, latentwire/encoder/seqcomp.py)."""
    seq_ratio: int = 4
    """Context tokens per latent: the receiver reads M = ceil(L / r) vectors for a context of L tokens."""
    seq_layer: int | None = None
    """Hidden-state layer of the frozen LLM the sender reads (0 = embeddings, -1 = last); default: the middle."""
    seq_width: int = 256
    """Width of the trainable compressor (sender encoder and receiver MLP)."""
    seq_layers: int = 1
    """Transformer layers over the context's hidden states before window pooling (0 = none)."""
    seq_dim: int = 32
    """Code dimensions per latent: what crosses the wire is M x seq-dim values."""
    seq_bits: int = 2
    """Bits per code value (1..8: uniform levels on [-1, 1] after tanh, trained through the quantizer with
    straight-through gradients; 16/32: floats). Bytes per context = ceil(M * dim * bits / 8)."""
    seq_steps: int = 300
    """Optimizer steps (one step = seq-batch questions through the frozen LLM, forward and backward)."""
    seq_batch: int = 8
    """Training questions per step."""
    seq_decoder: str = "mlp"
    """The receiver's decoder: mlp (an MLP into the embedding space at the table's RMS) | vocab (a softmax over the
    receiver's own embedding table: every vector it reads is a convex combination of its token embeddings)."""
    seq_recon_steps: int = 0
    """Token-reconstruction steps first, without the LLM (vocab decoder only): each latent's vocabulary logits
    against its window's tokens (at r = 1: send every token). Cheap: no forward through the LLM."""
    seq_pretrain_steps: int = 0
    """Self-supervised steps before the QA steps (ICAE-style autoencoding): the receiver reads
    [head][latents] and is trained to write the context's own tokens back (teacher-forced CE), on the
    training paragraphs; 0 = off."""
    seq_lr: float = 2e-3
    """Peak AdamW learning rate (warm-up then cosine)."""
    seq_warmup: int = 20
    """Warm-up steps."""
    seq_w_kl: float = 1.0
    """Weight of KL(teacher with the full text || student with the latents) on the answer positions."""
    seq_w_ce: float = 1.0
    """Weight of teacher-forced cross-entropy on the gold answer tokens."""
    seq_teacher_topk: int = 64
    """Teacher next-token log-probabilities kept per answer position (the KL is taken on these ids)."""
    seq_max_questions: int = 2000
    """Training questions (the first N of the training split, articles round-robin) whose teacher outputs and
    context states are computed once and cached ($LATENTWIRE_CACHE/seq_teacher, keyed by model weights, layer,
    top-k and every prompt)."""
    seq_max_tokens: int = 256
    """Token budget of a training prompt (its context shortened to fit)."""
    seq_ref_questions: int = 32
    """Training questions on which the loss of the references (whole context as text, its first M tokens, no
    context) is measured once before training, the yardstick of the loss curve (log, plot, report); 0 = skip."""
    seq_seed: int = 0
    """Seed of the compressor's initialisation and batch order (the data and evaluation questions keep --seed,
    so runs that differ only in --seq-seed are paired on the same questions)."""
    seq_ckpt_every: int = 25
    """Checkpoint every N steps (atomic; also on SIGINT/SIGTERM)."""
    seq_preset: str | None = None
    """quick (a first look: 60 steps on 400 training questions) | default (300 steps on 2,000 questions); the
    README gives their measured times. Explicit --seq-* flags win over the preset."""
    seq_path: str | None = None
    """Load a trained compressor (seq_compressor.pt of an earlier run) instead of training one."""
    seq_sender_path: str | None = None
    """Share the sender of an earlier run (its seq_compressor.pt): its encoder -- and so every payload, byte for
    byte -- is loaded and frozen, and only this receiver's decoder is trained. How a second receiver reads one
    wire (--model: the new receiver; --sender-model: the earlier run's sender)."""

    def validate(self) -> None:
        for n in ("seq_ratio", "seq_width", "seq_dim", "seq_batch", "seq_lr", "seq_teacher_topk",
                  "seq_max_questions", "seq_ckpt_every"):
            _positive(n, getattr(self, n))
        for n in ("seq_layers", "seq_warmup", "seq_w_kl", "seq_w_ce", "seq_pretrain_steps", "seq_recon_steps",
                  "seq_steps"):
            _positive(n, getattr(self, n), allow_zero=True)
        _choice("seq_decoder", self.seq_decoder, ("mlp", "vocab"))
        if self.seq_recon_steps and self.seq_decoder != "vocab":
            raise LatentWireError("--seq-recon-steps trains the vocab decoder's logits: add --seq-decoder vocab")
        if not (self.seq_steps or self.seq_pretrain_steps or self.seq_recon_steps):
            raise LatentWireError("--seq-steps, --seq-pretrain-steps and --seq-recon-steps are all 0: nothing to "
                                  "train")
        if self.seq_w_kl == 0 and self.seq_w_ce == 0:
            raise LatentWireError("--seq-w-kl and --seq-w-ce are both 0: there is nothing to train")
        if not (1 <= self.seq_bits <= 8 or self.seq_bits in (16, 32)):
            raise LatentWireError(f"--seq-bits {self.seq_bits}: choose 1..8, 16 or 32")
        if self.seq_width % 4:
            raise LatentWireError(f"--seq-width {self.seq_width}: must be a multiple of 4 (4 attention heads)")
        if self.seq_max_tokens < 16:
            raise LatentWireError(f"--seq-max-tokens must be >= 16 (got {self.seq_max_tokens})")
        if self.seq_preset is not None:
            _choice("seq_preset", self.seq_preset, tuple(SEQ_PRESETS))
        for n in ("seq_path", "seq_sender_path"):
            if getattr(self, n) is not None and not Path(getattr(self, n)).is_file():
                raise LatentWireError(f"{_flag(n)} {getattr(self, n)}: no such file")
        if self.seq_path and self.seq_sender_path:
            raise LatentWireError("--seq-path loads a whole compressor; --seq-sender-path trains a decoder for a "
                                  "loaded sender: give one")


@dataclass
class OptConfig:
    """The per-paragraph ceiling (`--pipeline opt-{emb,kv}-{copy,use}`, latentwire/pipelines/optimized.py): M
    positions fitted for each paragraph by gradient descent, started at truncation."""
    opt_steps: int = 40
    """use: Adam steps per paragraph at most (it stops when the held-out probes' KL has not improved for
    --opt-patience evaluations)."""
    opt_copy_steps: int = 60
    """copy: Adam steps per paragraph at most (it stops at 100% teacher-forced token accuracy)."""
    opt_copy_lr: float = 5e-2
    """copy: Adam's step size in units of each tensor's RMS (copying needs larger moves than use)."""
    opt_lr: float = 1e-3
    """Adam's step size, in units of each fitted tensor's RMS at the start (per layer, keys and values apart; the
    input vectors as one): the fitted state is start + RMS * delta."""
    opt_batch: int = 16
    """Probes per step."""
    opt_questions: int = 64
    """use: questions the LLM samples about the paragraph (duplicates dropped), each answered by the LLM reading
    it (self-study probes)."""
    opt_continue: int = 32
    """use: cue-and-continue probes (a snippet of the paragraph; the target is the tokens after it)."""
    opt_holdout: float = 0.2
    """use: share of the probes held out; the state with the lowest held-out KL (step 0 included) is kept."""
    opt_eval_every: int = 5
    """use: steps between held-out evaluations."""
    opt_patience: int = 3
    """use: stop after this many held-out evaluations without improvement (0 = never stop early)."""
    opt_l2: float = 0.0
    """Weight of mean(delta^2), the squared distance to the start (truncation) in units of its RMS."""
    opt_topk: int = 64
    """Teacher log-probabilities kept per target token (the KL is taken over them)."""
    opt_seed: int = 0
    """Seed of the probes (question sampling, snippets) and batch order."""
    opt_wire_bits: str = "16"
    """Bits per value on the wire, comma-separated, each its own pipeline over the same fits: 32/16 (floats) or
    1..8 (per-vector absmax levels, an fp16 scale per vector); e.g. 16,8,4,2 to see how far it squeezes."""

    def wire_bits(self) -> list[int]:
        try:
            return [int(b) for b in self.opt_wire_bits.split(",") if b.strip()]
        except ValueError:
            raise LatentWireError(f"--opt-wire-bits {self.opt_wire_bits!r}: expected integers like 16,8,4") from None

    def validate(self) -> None:
        for n in ("opt_steps", "opt_lr", "opt_copy_steps", "opt_copy_lr", "opt_batch", "opt_eval_every", "opt_topk"):
            _positive(n, getattr(self, n))
        for n in ("opt_questions", "opt_continue", "opt_patience", "opt_l2"):
            _positive(n, getattr(self, n), allow_zero=True)
        if not 0.0 <= self.opt_holdout < 1.0:
            raise LatentWireError(f"--opt-holdout must be in [0, 1) (got {self.opt_holdout})")
        bits = self.wire_bits()
        if not bits or any(not (1 <= b <= 8 or b in (16, 32)) for b in bits):
            raise LatentWireError(f"--opt-wire-bits {self.opt_wire_bits!r}: each 1..8, 16 or 32")


@dataclass
class EncConfig:
    """The pooled LM encoder (`latentwire train-encoder`, latentwire/encoder/lmenc.py and lmtrain.py): a trainable copy
    of the receiver's LM reads the paragraph, its final states mean-pooled over every r tokens, through a
    projector into the frozen receiver's embedding space."""
    enc_ratio: int = 4
    """Context tokens per position: the receiver reads M = ceil(L / r) vectors for a paragraph of L tokens."""
    enc_input: str = "all"
    """all: the encoder reads every token, pooled by r | first-m: the control -- it reads only the first
    M = ceil(L / r) tokens, one position each (truncation's content, trained the same way: what training alone
    adds)."""
    enc_tune: str = "full"
    """Which of the sender's weights train: full (all; the measured design, too large to ship) | lora (peft
    adapters of rank --enc-lora-rank on every linear layer) | top (the top --enc-top-layers blocks and the final
    norm). Only the trainable part is saved and shipped."""
    enc_lora_rank: int = 16
    """LoRA rank (--enc-tune lora); alpha = rank."""
    enc_top_layers: int = 2
    """Trainable top blocks (--enc-tune top)."""
    enc_dz: int = 0
    """Bottleneck dimensions per position (0: none -- the sender runs the projector and the d_model-dim vectors
    cross as floats). With one, the sender sends d_z codes and the receiver maps them up."""
    enc_bits: int = 16
    """Bits per value on the wire: 16/32 floats, or 1..8 (tanh, then uniform levels on [-1, 1], trained
    straight-through; needs --enc-dz > 0)."""
    enc_hidden: int = 0
    """Hidden width of the projector's residual MLP (0: 2 x d_model)."""
    enc_start: str = "states"
    """What each vector starts from before the projector adds to it. states: the pooled final states themselves
    (rescaled to the receiver's mean embedding RMS) | embeds: the mean of the group's token embeddings (the
    receiver's own table; rescaled to the group's mean token norm), the projector adding what the sender's states
    say -- at step 0 the first-M control *is* truncation, and the wire starts from each group's mean embedding.
    With a bottleneck (--enc-dz > 0) only for --enc-input first-m: the payload is then truncation's M token ids
    plus M x d_z codes (a side channel the receiver adds to the ids' embeddings); a pooled group's mean embedding
    would need all of its tokens on the wire."""
    enc_steps_a: int = 300
    """Stage A steps: half reconstruction (the receiver repeats the first --enc-recon-tokens context tokens after
    the vectors), half continuation (the encoder reads a prefix, the receiver writes the next --enc-cont-tokens)."""
    enc_steps_b: int = 550
    """Stage B steps: teacher-forced CE on ' ' + gold answer + newline, plus --enc-w-kl x KL to the receiver
    reading the text."""
    enc_time_limit: float = 0.0
    """Stop training after this many seconds (0: no limit); the checkpoint and the best state are saved, and
    --resume continues from them (several short GPU windows add up)."""
    enc_batch: int = 32
    """Examples per step."""
    enc_lr: float = 1e-4
    """Peak AdamW learning rate of the sender LM's trainable weights (warm-up, then cosine to 10%)."""
    enc_lr_proj: float = 1e-3
    """Peak learning rate of the projector (and bottleneck)."""
    enc_warmup: int = 50
    """Warm-up steps (of each stage)."""
    enc_clip: float = 1.0
    """Gradient-norm clip."""
    enc_recon_tokens: int = 128
    """Stage A reconstruction target: N context tokens (the first N, or a window of N: --enc-recon-span)."""
    enc_recon_span: str = "first"
    """Where stage A's reconstruction target lies: `first` (the first --enc-recon-tokens context tokens, the GPU
    recipe) or `window` (a window of that many tokens at a random place in the paragraph, its first
    --enc-recon-anchor tokens given to the receiver untrained, so that it knows where to copy from): the
    answers of stage B lie anywhere in the paragraph, and `first` trains exact copying of its start only."""
    enc_recon_anchor: int = 8
    """`--enc-recon-span window`: the window's first N tokens, read by the receiver after the cue, not trained."""
    enc_cont_tokens: int = 64
    """Stage A continuation target: the next N tokens after a prefix of L/3..2L/3."""
    enc_w_kl: float = 0.5
    """Weight of KL(receiver reading the text || receiver reading the vectors) on the answer tokens (stage B);
    over the teacher's top --enc-teacher-topk tokens."""
    enc_teacher_topk: int = 64
    """Teacher log-probabilities kept per answer token."""
    enc_max_tokens: int = 256
    """Context tokens a training paragraph is cut to."""
    enc_heldout_paragraphs: int = 100
    """Training paragraphs held out of training (the last ones, articles round-robin)."""
    enc_heldout_questions: int = 150
    """Questions of the held-out paragraphs answered (greedy, F1) at every evaluation; the best state is kept."""
    enc_eval_every: int = 100
    """Steps between held-out evaluations (and at step 0 of a fresh run and at the end of each stage)."""
    enc_ckpt_every: int = 100
    """Checkpoint every N steps (atomic; also at the time limit and on SIGINT/SIGTERM)."""
    enc_cache_bottom: bool = False
    """--enc-tune top only: compute the frozen bottom layers' states of each training paragraph once, before
    the first step, and keep them (in memory, and under $LATENTWIRE_CACHE/enc_bottom keyed by the model's
    weights, the layer and the precision, for every later run); a step then runs only the top --enc-top-layers
    blocks of the sender (the CPU variant)."""
    enc_cache_teacher: bool = True
    """Compute the teacher's top-k of every training question once, before the first stage-B step (a paragraph's
    questions share its K/V), and keep them (in memory, and under $LATENTWIRE_CACHE/enc_teacher keyed by the
    model's weights, the prompt head, k and the precision; each entry by its question's tokens). Off: each
    step runs the teacher on its batch."""
    enc_precision: str = "auto"
    """The training step's arithmetic: auto (bf16 autocast on a GPU and on a CPU with bf16 instructions --
    avx512_bf16 / amx_bf16 --, fp32 elsewhere) | bf16 | fp32. The held-out evaluation and the shipped weights'
    use are fp32 on a CPU either way."""
    enc_threads: int = 0
    """torch CPU threads for training (0: torch's default, one per core)."""
    enc_seed: int = 0
    """Seed of the projector's initialisation, the held-out split and the batch order."""
    enc_save_dtype: str = "bfloat16"
    """dtype of the shipped tensors (bfloat16 halves the files; the evaluation reads the saved weights, so what
    is evaluated is what ships)."""

    def validate(self) -> None:
        for n in ("enc_ratio", "enc_batch", "enc_lr", "enc_lr_proj", "enc_clip", "enc_recon_tokens",
                  "enc_cont_tokens", "enc_teacher_topk", "enc_eval_every", "enc_ckpt_every", "enc_lora_rank",
                  "enc_top_layers", "enc_heldout_questions"):
            _positive(n, getattr(self, n))
        for n in ("enc_dz", "enc_hidden", "enc_steps_a", "enc_steps_b", "enc_warmup", "enc_w_kl", "enc_time_limit",
                  "enc_heldout_paragraphs"):
            _positive(n, getattr(self, n), allow_zero=True)
        _choice("enc_input", self.enc_input, ("all", "first-m"))
        _choice("enc_start", self.enc_start, ("states", "embeds"))
        if self.enc_start == "embeds" and self.enc_dz and self.enc_input != "first-m":
            raise LatentWireError(f"--enc-start embeds with --enc-dz {self.enc_dz} needs --enc-input first-m: a "
                                  "pooled group's mean embedding would need all its tokens on the wire")
        _choice("enc_tune", self.enc_tune, ("full", "lora", "top"))
        _choice("enc_recon_span", self.enc_recon_span, ("first", "window"))
        _positive("enc_recon_anchor", self.enc_recon_anchor, allow_zero=True)
        _choice("enc_save_dtype", self.enc_save_dtype, ("bfloat16", "float16", "float32"))
        _choice("enc_precision", self.enc_precision, ("auto", "bf16", "fp32"))
        _positive("enc_threads", self.enc_threads, allow_zero=True)
        if not (1 <= self.enc_bits <= 8 or self.enc_bits in (16, 32)):
            raise LatentWireError(f"--enc-bits {self.enc_bits}: choose 1..8, 16 or 32")
        if self.enc_bits < 16 and not self.enc_dz:
            raise LatentWireError(f"--enc-bits {self.enc_bits}: quantized codes need a bottleneck (--enc-dz > 0)")
        if not (self.enc_steps_a or self.enc_steps_b):
            raise LatentWireError("--enc-steps-a and --enc-steps-b are both 0: nothing to train")
        if self.enc_max_tokens < 16:
            raise LatentWireError(f"--enc-max-tokens must be >= 16 (got {self.enc_max_tokens})")
        if self.enc_cache_bottom and self.enc_tune != "top":
            raise LatentWireError("--enc-cache-bottom caches the frozen bottom layers: add --enc-tune top")


SEQ_PRESETS = {"quick": {"seq_steps": 60, "seq_max_questions": 400},
               "default": {"seq_steps": 300, "seq_max_questions": 2000}}
"""Training sizes of the learned sequence compressor (their measured times are in the README)."""


def apply_seq_preset(cfg: "RunConfig", keep=()) -> None:
    """Set --seq-preset's fields, except those the user gave explicitly."""
    for name, value in SEQ_PRESETS.get(cfg.seq.seq_preset or "", {}).items():
        if name not in keep:
            setattr(cfg.seq, name, value)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seq: SeqConfig = field(default_factory=SeqConfig)
    opt: OptConfig = field(default_factory=OptConfig)
    out: str = "runs/latest"
    """Run folder: config.json, logs, checkpoints, predictions, metrics, report."""
    controls: bool = True
    """Also evaluate the linear-PCA-inverse control."""
    progress: bool = True
    """Progress bars."""

    def validate(self) -> None:
        if self.train.steps_per_epoch is None:
            self.train.steps_per_epoch = 20 if self.adapter.adapter == "vocab" else 300
        if self.train.batch_tokens is None:
            self.train.batch_tokens = 256 if self.adapter.adapter == "vocab" else 1024
        self.model.validate()
        if self.model.cross():
            # a per-token code or a pooled embedding is in the sender's embedding space: only text, token ids and
            # the learned wire (a decoder of the receiver's own) cross to another vocabulary and width
            if self.eval.stage1:
                raise LatentWireError(f"--sender-model {self.model.sender_model}: Stage 1 codes are the sender's "
                                      "token identities, not the receiver's; add --no-stage1 (the sender_ids row "
                                      "measures what they would deliver)")
            cross_ok = ("truncate", "surprisal", "none", "learned", "text")
            if self.model.codec_model not in (None, self.model.model):  # coded by it, read by the receiver as text
                cross_ok += ("ac", "truncate+ac", "surprisal+ac")
            for k in self.eval.sequence_kinds() + self.eval.pipeline_specs():
                if k == "meanpool":
                    raise LatentWireError("--sequence meanpool with --sender-model: vectors in the sender's embedding "
                                          "space, which the receiver does not share (learned: a decoder per receiver)")
                if k not in cross_ok:
                    raise LatentWireError(f"--sender-model with {k}: only {', '.join(cross_ok)} cross to another "
                                          "receiver model (token choices read as text; learned: a decoder per "
                                          "receiver; the LLM-coded kinds with a --codec-model)")
        self.data.validate()
        self.eval.validate()
        self.compress.validate()
        self.adapter.validate()
        self.train.validate()
        self.seq.validate()
        self.opt.validate()


# The RunConfig sub-configs, in CLI order: one list for the CLI and the sweeps.
GROUPS = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig, "compress": CompressConfig,
          "adapter": AdapterConfig, "train": TrainConfig, "seq": SeqConfig, "opt": OptConfig}


SEED_PRESET = {"adapter": "mlp", "hidden_mult": 4, "dropout": 0.1, "residual": False, "init_pca": False,
               "input_norm": False, "output_norm": True, "calibration": "none", "w_cos": 1.0, "w_mse": 0.1,
               "vocab_fraction": 0.0, "anchor": "reconstructed", "wire_scope": "prompt", "bos": "none"}
"""The seed's configuration (field -> value), kept so its failure can be reproduced: an MLP with an output
LayerNorm, 0.1*MSE + cosine, the whole prompt (answer cue included) reconstructed."""


def apply_preset(cfg: RunConfig, keep=()) -> None:
    """Set the presets' fields (--preset seed, --seq-preset), except those in
    `keep` (field names the user gave explicitly: a flag or a sweep entry
    wins over a preset)."""
    apply_seq_preset(cfg, keep)
    if cfg.adapter.preset != "seed":
        return
    where = {f.name: g for g, cls in GROUPS.items() for f in fields(cls)}
    for name, value in SEED_PRESET.items():
        if name not in keep:
            setattr(getattr(cfg, where[name]), name, value)


def field_docs(cls) -> dict[str, str]:
    """Field docstrings, for --help (parsed from the source)."""
    import ast
    import inspect
    import textwrap

    src = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(src).body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


__all__ = ["GROUPS", "SEED_PRESET", "ModelConfig", "DataConfig", "EvalConfig", "CompressConfig", "AdapterConfig", "TrainConfig",
           "SeqConfig", "OptConfig", "EncConfig", "SEQ_PRESETS", "RunConfig", "apply_preset", "apply_seq_preset", "field_docs", "fields"]
