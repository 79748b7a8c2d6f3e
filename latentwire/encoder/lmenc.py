"""The pooled LM encoder: the project's learned wire.

Sender (sees the paragraph only): a *copy of the receiver's own pretrained
LM*, its weights trainable (all of them, LoRA adapters, or the top k
layers), reads the context's tokens; its final hidden states are
**mean-pooled over consecutive groups of r tokens** (M = ceil(L / r));
optionally a bottleneck maps each pooled vector to `d_z` dimensions that
cross the wire at `bits` bits (tanh then uniform levels, straight-through
in training); a residual MLP (d -> hidden GELU -> d, its second layer
zero-initialised, so that at the start the receiver reads the pooled states
themselves) maps each vector; each output is rescaled to the mean RMS of the
receiver's token embeddings. With `--enc-start embeds` each vector instead
starts from its group's mean token embedding (the receiver's own table, at
the group's mean token norm) and the MLP adds what the sender's states say:
an untrained first-M control then hands the receiver truncation's exact
embeddings.

Receiver: the frozen LM reads the M vectors as input embeddings where the
context's tokens were: [head + "Context:"] [M vectors] ["\\nQuestion: " q
"\\nAnswer:"].

Where the wire cuts it: with a bottleneck (d_z > 0) the sender sends the
d_z codes and the receiver runs the up-projection, the MLP and the rescale;
without one the sender runs everything and the M final vectors cross as
16-bit floats (the measured design: ~46 KB a paragraph).

Why a copy of the LM and not a small head on frozen states: the
per-paragraph ceiling (docs/ceiling.md) showed that M positions fitted for
one paragraph at a time do not beat truncation, and a frozen LM's states
read through a small compressor keep what sending nothing keeps
(docs/sequence-v0.1.md). An amortized encoder that is itself the LM learns
to write what the same LM reads (ICAE, ARC-Encoder, 500xCompressor build
their encoders the same way); pooling its *final* states keeps every token's
contribution in its group (the window's mean), with no query to learn.

Weights ship as the trainable part only (`save_encoder`): a LoRA adapter's
matrices or the top layers, beside the projector, as safetensors files of at
most 16 MB with a JSON of what made them; the rest is the receiver's own
model, which both ends already hold.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import EncConfig
from ..errors import LatentWireError
from ..llm.forward import decoder_stack, right_pad
from ..llm.models import same_model_source
from ..util.runio import TensorStore, atomic_write_bytes, atomic_write_text, content_key
from ..wire.wire import bounded_quantizer

FORMAT = 1
"""Of encoder.json: a reader refuses other formats."""
META = "encoder.json"
SHARD_BYTES = 15 * 2 ** 20
"""A safetensors file holds at most this many bytes of tensors (the archive limit is 16 MB a file)."""


def pool_states(h: torch.Tensor, mask: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each group of `ratio` consecutive positions. h [B, L, d] (right-padded), mask [B, L] bool ->
    pooled [B, M, d] with M = ceil(L / ratio), and its mask [B, M]: row b has ceil(L_b / ratio) groups, the last
    one the mean of the tokens it holds (padding never counts)."""
    B, L, d = h.shape
    M = math.ceil(L / ratio)
    pad = M * ratio - L
    m = F.pad(mask, (0, pad)).view(B, M, ratio)
    x = F.pad(h, (0, 0, 0, pad)).view(B, M, ratio, d)
    w = m.to(h.dtype)[..., None]
    n = w.sum(2)
    return (x * w).sum(2) / n.clamp_min(1), m.any(-1)


class PooledEncoder(torch.nn.Module):
    """Sender (`encode`: token ids -> codes [B, M, k]) and receiver-side map (`decode`: codes -> the vectors the
    frozen LM reads [.., d]); `forward` is the pair with the wire's quantizer between them (straight-through)."""

    def __init__(self, sender: torch.nn.Module, d_model: int, ratio: int, emb_rms: float, d_z: int = 0,
                 bits: int = 16, hidden: int = 0, first_m: bool = False, start: str = "states"):
        super().__init__()
        if d_z == 0 and bits not in (16, 32):
            raise LatentWireError(f"--enc-bits {bits}: without a bottleneck (--enc-dz 0) the vectors cross as "
                                  "16- or 32-bit floats")
        if start == "embeds" and d_z and not first_m:
            raise LatentWireError(f"--enc-start embeds with --enc-dz {d_z} needs --enc-input first-m")
        self.sender = sender
        self.ratio, self.d_z, self.bits, self.first_m = int(ratio), int(d_z), int(bits), bool(first_m)
        self.start = start
        hidden = hidden or 2 * d_model
        self.down = torch.nn.Linear(d_model, d_z) if d_z else None
        self.up = torch.nn.Linear(d_z, d_model) if d_z else None
        self.proj = torch.nn.Sequential(torch.nn.Linear(d_model, hidden), torch.nn.GELU(),
                                        torch.nn.Linear(hidden, d_model))
        torch.nn.init.zeros_(self.proj[2].weight)
        torch.nn.init.zeros_(self.proj[2].bias)
        self.register_buffer("target_rms", torch.tensor(float(emb_rms)))
        self.quantizer = bounded_quantizer(bits, d_z or d_model)
        self.bottom: BottomCache | None = None

    @property
    def code_dim(self) -> int:
        """Values per position on the wire (besides the token ids, where `sends_ids`)."""
        return self.d_z or self.proj[2].out_features

    @property
    def sends_ids(self) -> bool:
        """The side-channel wire (embeds start, first-M input, a bottleneck): the payload carries truncation's M
        token ids as well as the codes; the receiver adds the decoded codes to those tokens' embeddings."""
        return self.start == "embeds" and bool(self.d_z)

    def sender_input(self, ids: Sequence[int]) -> tuple[list[int], int]:
        """(the tokens the sender reads, the pooling ratio): all L tokens pooled by r; the first-M control reads
        only the first M = ceil(L / r) tokens, one position each (truncation's content, trained the same way)."""
        from ..pipelines.tokens import budget
        ids = list(ids)
        if self.first_m:
            return ids[:budget(len(ids), self.ratio)], 1
        return ids, self.ratio

    def states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The sender's final hidden states [B, L, d] (after its final norm)."""
        if self.bottom is not None:
            return self.bottom.states(self.sender, ids, mask)
        out = self.sender(input_ids=ids, attention_mask=mask.long(), use_cache=False)
        return out.last_hidden_state

    def cache_bottom(self, top_layers: int) -> None:
        """Keep the frozen bottom layers' states of every sequence the sender reads (BottomCache): only the top
        `top_layers` blocks run per step. For --enc-tune top, whose bottom never changes."""
        self.bottom = BottomCache(self.sender, top_layers)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        y = y + self.proj(y)
        return self.target_rms * y / y.float().pow(2).mean(-1, keepdim=True).add(1e-8).sqrt().to(y.dtype)

    def mean_embeds(self, ids: torch.Tensor, mask: torch.Tensor, ratio: int) -> torch.Tensor:
        """Each group's mean token embedding (the frozen table both ends hold), rescaled to the group's mean token
        norm: at r = 1 exactly the tokens' embeddings (what truncation hands the receiver)."""
        with torch.no_grad():
            e = self.sender.get_input_embeddings()(ids).float()
            mean, _ = pool_states(e, mask, ratio)
            norm, _ = pool_states(e.norm(dim=-1, keepdim=True), mask, ratio)
            return mean * norm / mean.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, ratio: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] right-padded, mask [B, L] -> codes [B, M, k] (what the quantizer writes) and mask [B, M]."""
        p, pm = pool_states(self.states(ids, mask), mask, ratio or self.ratio)
        if self.start == "embeds" and not self.d_z:
            # Why: the first-M control showed that the read-in (final states -> projector) loses the exact tokens
            # it is handed; starting from the tokens' own embeddings keeps them, and training adds the rest.
            return self.mean_embeds(ids, mask, ratio or self.ratio).to(p.dtype) + self.proj(p), pm
        if self.d_z:
            z = self.down(p)
            return (torch.tanh(z) if self.bits < 16 else z), pm
        return self._finish(p), pm

    def decode(self, z: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """codes [.., k] -> the vectors the receiver reads [.., d]. `base`: for the side-channel wire
        (`sends_ids`), the embeddings of the token ids that came with the codes; the codes add to them (the
        projector's last layer starts at zero, so an untrained side channel hands over truncation exactly)."""
        if self.sends_ids:
            if base is None:
                raise ValueError("this encoder's codes add to its token ids' embeddings: pass base")
            return base.to(z.dtype) + self.proj(self.up(z))
        return self._finish(self.up(z)) if self.d_z else z

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, ratio: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        z, m = self.encode(ids, mask, ratio)
        zq = self.quantizer.roundtrip(z.reshape(-1, z.shape[-1])).view(z.shape)
        base = self.mean_embeds(ids, mask, ratio or self.ratio) if self.sends_ids else None
        return self.decode(zq, base), m

    # --- what ships: the trainable part only
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every parameter that training changes (the sender's trainable ones, the bottleneck and the MLP)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}


PREFIX = 4
"""BottomCache indexes each stored sequence by its first 1..PREFIX ids (a prefix is looked up by its own)."""


class BottomCache:
    """The frozen bottom of a top-tuned sender, computed once per paragraph: hidden_states[n - k] (the input of
    the first trainable block), kept by the paragraph's token ids (in a TensorStore: in memory, and on disk when
    `fill` is given a folder); a step then runs the top k blocks and the final norm on those states (a shallow
    copy of the decoder whose `layers` are the top k: the same modules, so their training is the sender's).

    Why a prefix is served from its paragraph: the model is causal, so the states of tokens[:s] are the first
    s states of the whole paragraph -- a continuation example (the encoder reads a random prefix) and the first-M
    control cost no forward of their own. Checked on first use, in fp32: the top run on the bottom's states must
    equal the whole decoder's output, or the model's forward does not allow it (one-line error)."""

    def __init__(self, dec: torch.nn.Module, k: int):
        blocks = _blocks(dec)
        self.start, self.hits, self.misses, self.checked = len(blocks) - k, 0, 0, False
        self.store = TensorStore(None)
        self.full: dict[tuple, list[str]] = {}  # the first <= PREFIX ids -> the stored sequences starting so
        self.seqs: dict[str, list[int]] = {}
        self.top = copy.copy(dec)
        self.top._modules = dict(dec._modules)
        name = next(n for n in ("layers", "h", "blocks") if getattr(dec, n, None) is blocks)
        self.top._modules[name] = torch.nn.ModuleList(list(blocks)[self.start:])

    def _key(self, ids: Sequence[int]) -> str:
        return content_key(self.start, list(ids))[:32]

    def _find(self, ids: list[int]) -> torch.Tensor | None:
        """The stored states of `ids`, or of a stored sequence that starts with them (sliced)."""
        got = self.store.get(self._key(ids))
        if got is not None:
            return got["h"]
        for key in self.full.get(tuple(ids[:PREFIX]), ()):
            seq = self.seqs[key]
            if len(seq) >= len(ids) and seq[:len(ids)] == ids:
                return self.store.get(key)["h"][:len(ids)]
        return None

    def _add(self, ids: list[int], h: torch.Tensor) -> None:
        key = self._key(ids)
        self.store.put(key, {"h": h.float(), "ids": torch.tensor(ids, dtype=torch.int32)})
        self._index(key, ids)

    def _index(self, key: str, ids: list[int]) -> None:
        self.seqs[key] = ids
        for n in range(1, min(PREFIX, len(ids)) + 1):  # a prefix of any length finds it by its first <= 4 ids
            self.full.setdefault(tuple(ids[:n]), []).append(key)

    @torch.no_grad()
    def fill(self, dec, seqs: Sequence[Sequence[int]], folder: str | Path | None = None, batch: int = 8,
             progress: bool = False) -> int:
        """Compute (or read from `folder`) the bottom's states of every sequence; returns how many were computed.
        The folder should be keyed by the model's weights and `start` (its entries are keyed by the ids)."""
        from tqdm.auto import tqdm
        if folder is not None:
            self.store = TensorStore(folder) if self.store.folder is None else self.store
            for key, t in self.store.memo.items():
                if key not in self.seqs and "ids" in t:
                    self._index(key, t["ids"].tolist())
        todo = [list(s) for s in dict.fromkeys(tuple(s) for s in seqs) if self._find(list(s)) is None]
        dev = next(dec.parameters()).device
        for i in tqdm(range(0, len(todo), batch), desc="bottom states", disable=not progress):
            rows = todo[i:i + batch]
            x, m = right_pad([torch.tensor(r, dtype=torch.long, device=dev) for r in rows])
            hs = dec(input_ids=x, attention_mask=m.long(), use_cache=False,
                     output_hidden_states=True).hidden_states[self.start]
            for j, r in enumerate(rows):
                self._add(r, hs[j, :len(r)])
            if (i // batch) % 50 == 49:
                self.store.flush()
        self.store.flush()
        return len(todo)

    def states(self, dec, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lens = mask.sum(1).tolist()
        seqs = [ids[b, :n].tolist() for b, n in enumerate(lens)]
        found = [self._find(s) for s in seqs]
        miss = [b for b, f in enumerate(found) if f is None]
        self.hits += len(seqs) - len(miss)
        self.misses += len(miss)
        if miss:
            with torch.no_grad():
                hs = dec(input_ids=ids[miss], attention_mask=mask[miss].long(), use_cache=False,
                         output_hidden_states=True).hidden_states[self.start]
            for j, b in enumerate(miss):
                self._add(seqs[b], hs[j, :lens[b]])
                found[b] = self._find(seqs[b])
        h = torch.zeros(ids.shape + (found[0].shape[-1],), dtype=torch.float32, device=ids.device)
        for b, f in enumerate(found):
            h[b, :lens[b]] = f.to(ids.device, torch.float32)
        if not self.checked:
            self._check(dec, ids, mask)
        return self.top(inputs_embeds=h, attention_mask=mask.long(), use_cache=False).last_hidden_state

    @torch.no_grad()
    def _check(self, dec, ids: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.autocast(ids.device.type, enabled=False):
            hs = dec(input_ids=ids, attention_mask=mask.long(), use_cache=False,
                     output_hidden_states=True).hidden_states[self.start]
            out = self.top(inputs_embeds=hs, attention_mask=mask.long(), use_cache=False).last_hidden_state
            full = dec(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state
        if not torch.allclose(out[mask], full[mask], atol=1e-4, rtol=1e-3):
            raise LatentWireError("--enc-cache-bottom: this model's top layers on cached states do not "
                                  "reproduce its forward; train without it")
        self.checked = True


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The LM without its output head (embeddings, blocks, final norm): what the sender runs."""
    return decoder_stack(model)


def _blocks(dec: torch.nn.Module) -> torch.nn.ModuleList:
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(dec, name, None), torch.nn.ModuleList):
            return getattr(dec, name)
    raise LatentWireError(f"{type(dec).__name__}: cannot find its transformer blocks (layers)")


def make_sender(lm, cfg: EncConfig) -> torch.nn.Module:
    """A trainable copy of the receiver's decoder stack, in fp32, tuned as cfg.enc_tune says:
    full (every weight), lora (peft adapters of rank enc_lora_rank on every linear layer; the rest frozen) or
    top (the top enc_top_layers blocks and the final norm; the rest frozen)."""
    dec = copy.deepcopy(decoder_of(lm.model)).float()
    for p in dec.parameters():
        p.requires_grad_(cfg.enc_tune == "full")
    if cfg.enc_tune == "top":
        blocks = _blocks(dec)
        if not 1 <= cfg.enc_top_layers <= len(blocks):
            raise LatentWireError(f"--enc-top-layers {cfg.enc_top_layers}: this model has {len(blocks)} layers")
        for b in list(blocks)[len(blocks) - cfg.enc_top_layers:]:
            b.requires_grad_(True)
        norm = getattr(dec, "norm", None)
        if norm is not None:
            norm.requires_grad_(True)
    elif cfg.enc_tune == "lora":
        from peft import LoraConfig, get_peft_model
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in dec.named_modules() if isinstance(m, torch.nn.Linear)})
        lcfg = LoraConfig(r=cfg.enc_lora_rank, lora_alpha=cfg.enc_lora_rank, lora_dropout=0.0,
                          target_modules=targets)
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to answer
            warnings.simplefilter("ignore", FutureWarning)
            dec = get_peft_model(dec, lcfg)
    return dec


def build_encoder(lm, cfg: EncConfig) -> PooledEncoder:
    """A fresh encoder for receiver `lm` (its sender a trainable copy of lm's LM)."""
    table = lm.embedding_table().float()
    emb_rms = float(table.pow(2).mean(-1).sqrt().mean())
    enc = PooledEncoder(make_sender(lm, cfg), lm.d_model, cfg.enc_ratio, emb_rms, cfg.enc_dz, cfg.enc_bits,
                        cfg.enc_hidden, cfg.enc_input == "first-m", cfg.enc_start)
    if cfg.enc_cache_bottom:
        enc.cache_bottom(cfg.enc_top_layers)
    return enc.to(lm.device)


# ------------------------------------------------------------- save / load

SHAPE_FIELDS = ("enc_ratio", "enc_tune", "enc_lora_rank", "enc_top_layers", "enc_dz", "enc_bits", "enc_hidden",
                "enc_input", "enc_start")
"""The config fields that decide the encoder's parameters and wire (saved; a loader rebuilds from them)."""


PART = "@part"
"""A tensor larger than a file is saved as row blocks NAME@partK (k = 0, 1, ...), joined again on load."""


def _shard(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in files of at most `limit` bytes each (a tensor larger than that split into row blocks)."""
    pieces: dict[str, torch.Tensor] = {}
    for k in sorted(state):
        v = state[k]
        n = v.numel() * v.element_size()
        if n <= limit or v.dim() == 0 or v.shape[0] < 2:
            pieces[k] = v
            continue
        rows = max(1, limit // max(1, n // v.shape[0]))
        for i, s in enumerate(range(0, v.shape[0], rows)):
            pieces[f"{k}{PART}{i}"] = v[s:s + rows].contiguous()
    shards, cur, size = [], {}, 0
    for k, v in pieces.items():
        n = v.numel() * v.element_size()
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += n
    return shards + ([cur] if cur or not shards else [])


def _join(pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of _shard's row blocks."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for k, v in pieces.items():
        name, sep, i = k.partition(PART)
        if sep and i.isdigit():
            parts.setdefault(name, {})[int(i)] = v
        else:
            out[k] = v
    for name, blocks in parts.items():
        out[name] = torch.cat([blocks[i] for i in range(len(blocks))])
    return out


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 (32 hex) of the shipped tensors, names and values: what the frame of a payload names."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def save_encoder(enc: PooledEncoder, folder: str | Path, lm, cfg: EncConfig, record: dict,
                 dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write the trainable part as safetensors shards (<= SHARD_BYTES each, `dtype`) and encoder.json (shape,
    the receiver's identity, the record: command, data, steps, seconds, metrics, code version). Atomic per
    file; encoder.json is written last, so a folder with it is complete. Returns the metadata."""
    from safetensors.torch import save as st_save
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in enc.trainable_state().items()}
    shards = _shard(state, SHARD_BYTES)
    names = [f"encoder-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for old in folder.glob("encoder-*.safetensors"):
        if old.name not in names:
            old.unlink()
    for name, sh in zip(names, shards):
        atomic_write_bytes(folder / name, st_save(sh))
    meta = {"format": FORMAT, "shape": {k: getattr(cfg, k) for k in SHAPE_FIELDS}, "files": names,
            "dtype": str(dtype).replace("torch.", ""), "digest": state_digest(state),
            "bytes": sum(v.numel() * v.element_size() for v in state.values()),
            "receiver": lm.fingerprint() | {"weights": lm.weights_digest()}, "record": record}
    atomic_write_text(folder / META, json.dumps(meta, indent=1, default=str))
    return meta


def read_meta(folder: str | Path, flag: str = "--pipeline") -> dict:
    """encoder.json of a folder, checked (one-line errors naming `flag`), before any model work."""
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise LatentWireError(f"{flag} {folder}: no {META} (not a trained LM encoder's folder)") from None
    except (OSError, ValueError) as e:
        raise LatentWireError(f"{flag} {path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LatentWireError(f"{flag} {path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"this version reads {FORMAT}")
    for f in meta.get("files", []):
        if "/" in f or not (Path(folder) / f).is_file():
            raise LatentWireError(f"{flag} {folder}: {META} names {f}, which is not in the folder")
    return meta


def config_of(meta: dict) -> EncConfig:
    cfg = EncConfig()
    for k, v in meta["shape"].items():
        if k in SHAPE_FIELDS:
            setattr(cfg, k, v)
    return cfg


def load_encoder(lm, folder: str | Path, flag: str = "--pipeline") -> tuple[PooledEncoder, dict]:
    """The encoder saved in `folder` for receiver `lm` (refused, naming `flag`, when made for another model or
    when a tensor is missing or extra). Loads safetensors only: nothing in the folder runs code."""
    from safetensors.torch import load_file

    meta = read_meta(folder, flag)
    fp = lm.fingerprint()
    rec = meta.get("receiver", {})
    for k in ("d_model", "vocab_size"):
        if rec.get(k) != fp[k]:
            raise LatentWireError(f"{flag} {folder}: trained for a receiver with {k}={rec.get(k)!r}; this one has "
                                  f"{fp[k]!r}")
    if rec.get("weights") != lm.weights_digest() and not same_model_source(rec.get("model"), fp["model"]):
        raise LatentWireError(f"{flag} {folder}: trained for receiver {rec.get('model')!r} (weights "
                              f"{str(rec.get('weights'))[:12]}), not {lm.name!r}")
    enc = build_encoder(lm, config_of(meta))
    state: dict[str, torch.Tensor] = {}
    for f in meta["files"]:
        try:
            state.update(load_file(str(Path(folder) / f)))
        except Exception as e:  # a torn or foreign file: one line naming it
            raise LatentWireError(f"{flag} {Path(folder) / f}: not a readable safetensors file ({e})") from None
    try:
        state = _join(state)
    except (RuntimeError, KeyError) as e:
        raise LatentWireError(f"{flag} {folder}: a tensor's row blocks do not join ({e})") from None
    want = enc.trainable_state()
    if set(state) != set(want):
        miss, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        raise LatentWireError(f"{flag} {folder}: its tensors do not match its encoder.json shape "
                              f"(missing {miss[:2]}, extra {extra[:2]})")
    enc.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return enc.eval(), meta


__all__ = ["PooledEncoder", "build_encoder", "config_of", "decoder_of", "load_encoder",
           "make_sender", "pool_states", "read_meta", "save_encoder", "state_digest"]
