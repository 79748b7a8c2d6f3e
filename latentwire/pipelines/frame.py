"""The frame around a payload file: 8 bytes that say what made the payload,
so that a reader refuses a payload it cannot read instead of decoding it to
garbage (`latentwire send` writes it, `latentwire ask` and `latentwire.ask`
read it; the evaluation counts the payload's own bytes, never the frame's).

Layout (version 1, 8 bytes, then the payload as the pipeline made it):

    offset size
    0      2    magic b"LW"
    2      1    format version (1)
    3      1    pipeline tag: blake2b-8 of its label (`Pipeline.identity()["pipeline"]`: the kind with its
                ratio, e.g. truncate_r4, ac, learned_r4)
    4      1    receiver fingerprint: blake2b-8 of the receiver model's weights digest, when the payload
                depends on the receiver (token ids, embeddings); of nothing when it does not (text, an `ac`
                payload read through text)
    5      1    codec/weights fingerprint: blake2b-8 of the codec model's digest and the trained weights' digest
    6      2    CRC-16/CCITT (init 0xFFFF, big-endian) of bytes 0..5 and the payload

The tag and fingerprints are one byte each, hashed: a reader with another
pipeline or model is refused unless its byte collides (1 in 256 each); the
error names the sides by a table of the labels the registry's kinds take at
the usual ratios (`known_labels`), else by the byte. The CRC catches any
corrupted byte of the file (all 1-bit and 2-bit errors, and all but 1 in
65,536 others), before any model is loaded. LLM-coded payloads also carry
their own integrity check (`wire.ids_check`), which catches a reader whose
model computes other numbers.
"""
from __future__ import annotations

import binascii
import hashlib
from pathlib import Path

from ..errors import LatentWireError
from ..wire.wire import Payload
from . import KINDS
from ..llm.models import file_digest

MAGIC = b"LW"
VERSION = 1
FRAME_BYTES = 8
LABEL_RATIOS = (1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
"""Ratios `known_labels` names (a frame made at another ratio is named by its byte)."""


def _byte(*parts) -> int:
    h = hashlib.blake2b(digest_size=1)
    for p in parts:
        h.update(b"\x00" if p is None else str(p).encode() + b"\x01")
    return h.digest()[0]


def kind_label(kind: str, ratio: float) -> str | None:
    """The label a registry kind's pipeline has at `ratio` (its `name`), or None for a trained kind (its label
    comes from its weights). Tested equal to the built pipelines' names."""
    k = KINDS.get(kind)
    if k is None or k.trained:
        return None
    if not k.ratio:
        return kind
    base, plus, coding = kind.partition("+")
    return f"{base}_r{ratio:g}" + (f"+{coding}" if plus else "")


def known_labels() -> list[str]:
    """Every label of the registry's kinds at LABEL_RATIOS, the pooled LM encoder's (without a bottleneck), the
    v0.1 learned compressor's and Stage 1's."""
    out = ["latentwire"] + [f"{k}_r{r:g}" for k in ("lmenc", "learned") for r in LABEL_RATIOS]
    for k in KINDS:
        out += list(dict.fromkeys(kind_label(k, r) for r in LABEL_RATIOS if kind_label(k, r)))
    return out


def _names(tag: int) -> str:
    names = [n for n in known_labels() if _byte(n) == tag]
    return (" or ".join(names) if names else "an unknown pipeline") + f" (tag 0x{tag:02x})"


def _header(identity: dict) -> bytes:
    return (MAGIC + bytes([VERSION, _byte(identity["pipeline"]), _byte(identity.get("receiver")),
                           _byte(identity.get("codec"), identity.get("weights"))]))


def _crc(head: bytes, payload: bytes) -> bytes:
    return binascii.crc_hqx(payload, binascii.crc_hqx(head, 0xFFFF)).to_bytes(2, "big")


def wrap(pipeline, payload: bytes) -> bytes:
    """The payload in its frame: what `latentwire send` writes (FRAME_BYTES more than the payload)."""
    head = _header(pipeline.identity())
    return head + _crc(head, bytes(payload)) + bytes(payload)


def check(data: bytes, where: str = "payload", pipeline: str | None = None) -> tuple[bytes, bytes]:
    """What can be checked without a model: the magic, the version, the CRC and, when `pipeline` (the reader's
    label) is given, the pipeline tag. Returns (header, payload); a one-line LatentWireError naming `where`."""
    data = bytes(data)
    if len(data) < FRAME_BYTES or data[:2] != MAGIC:
        raise LatentWireError(f"{where}: not a latentwire payload file (no {MAGIC.decode()} frame: written by "
                              "something else, or by a latentwire before frames; send the paragraph again)")
    if data[2] != VERSION:
        raise LatentWireError(f"{where}: frame version {data[2]}; this latentwire reads version {VERSION}")
    head, crc, payload = data[:6], data[6:8], data[8:]
    if _crc(head, payload) != crc:
        raise LatentWireError(f"{where}: corrupted: its checksum does not match its bytes (CRC "
                              f"0x{crc.hex()} stored, 0x{_crc(head, payload).hex()} computed)")
    if pipeline is not None and head[3] != _byte(pipeline):
        raise LatentWireError(f"{where}: made by {_names(head[3])}, not by {pipeline} (tag 0x{_byte(pipeline):02x}), "
                              "the pipeline reading it (--pipeline/--ratio as at `send`)")
    return head, payload


def unwrap(pipeline, data: bytes, where: str = "payload") -> Payload:
    """The payload of a framed file, checked against the reading pipeline (`pipeline.identity()`): a one-line
    LatentWireError naming both sides when it was made by another pipeline, ratio, receiver, codec model or
    trained weights, or when its bytes are corrupted."""
    ident = pipeline.identity()
    head, payload = check(data, where, ident["pipeline"])
    want = _header(ident)
    if head[4] != want[4]:
        raise LatentWireError(f"{where}: made for another receiver model (fingerprint 0x{head[4]:02x}) than this "
                              f"one, {_model_name(pipeline.lm)} (0x{want[4]:02x}) (--model as at `send`)")
    if head[5] != want[5]:
        codec = getattr(pipeline, "codec_lm", None)
        mine = ", ".join(x for x in (f"codec model {_model_name(codec)}" if codec is not None else "",
                                     "trained weights " + ident["weights"][:12] if ident.get("weights") else "") if x)
        raise LatentWireError(f"{where}: made with another codec model or trained weights (fingerprint "
                              f"0x{head[5]:02x}) than this reader's {mine or 'none'} (0x{want[5]:02x}) "
                              "(--codec-model / --model / --template / the run folder as at `send`)")
    return Payload(payload)


def _model_name(lm) -> str:
    return getattr(lm, "name", None) or "?"


def files_digest(paths) -> str | None:
    """A digest of trained weights' files (for `Pipeline.weights_digest`), None when there are none."""
    files = sorted(Path(p) for p in paths if Path(p).is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + file_digest(f).encode())
    return h.hexdigest()[:32]


RUN_WEIGHT_FILES = ("seq_compressor.pt", "compressor.pt", "adapter.pt", "quantizer.pt")
"""A run folder's files whose content a payload of its pipeline depends on."""


__all__ = ["FRAME_BYTES", "MAGIC", "RUN_WEIGHT_FILES", "VERSION", "check", "files_digest", "kind_label",
           "known_labels", "unwrap", "wrap"]
