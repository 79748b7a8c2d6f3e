"""The wire: what a sender actually transmits about a prompt's context, in
bytes, and how a receiver turns it back into what the frozen LLM reads.

A *pipeline* is a sender (context -> `Payload`, whose `data` is the exact
byte string that crosses the wire) and a receiver (payload -> the token ids
or the [M, d] embeddings the LLM reads where the context was). Only the
context is sent (`--wire-scope context`, the default): the few-shot shots,
the question and the answer cue are the receiver's own text. Every pipeline
-- text, Stage 1 (PCA + quantizer + adapter), and later sequence compressors
-- is evaluated through `pipeline.payload()` / `pipeline.receive()`, so the
byte counts are the lengths of real byte strings, never a formula.

Byte-count conventions (stated in the README):
* transport framing is not counted (the message length is known, as for any
  file or packet; a payload file's 8-byte frame, latentwire/pipelines/frame.py, is
  reported beside the payload); a payload whose values are narrower than a byte carries
  a varint count of positions, because its padding would be ambiguous;
* what both ends hold before any message -- the model, the tokenizer, the
  PCA basis, the quantizer's levels, the adapter -- is not sent per context.

Text references (`TEXT_CODECS`): UTF-8, zstd (level 19), lzma (preset 9e),
token ids at ceil(log2 V) bits, and the frozen LLM's own code: arithmetic
coding of the context's tokens with the LM's next-token distribution
(`constriction`'s range coder; a real, decoded round trip), beside its bound
sum(-log2 p(token | prefix)).
"""
from __future__ import annotations

import contextlib
import hashlib
import lzma
import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import LatentWireError
from ..data import context_token_ids, distinct_contexts


class Payload(bytes):
    """What crosses the wire for one context: the bytes themselves (`bytes(p)`,
    `len(p)`; write them to a file as they are), and `positions`, the vectors
    or tokens the receiver puts where the context was (for the report; a
    receiver learns it from the bytes)."""

    def __new__(cls, data: bytes = b"", positions: int = 0):
        obj = super().__new__(cls, data)
        obj.positions = int(positions)
        return obj

    @property
    def data(self) -> bytes:
        return bytes(self)

    @property
    def nbytes(self) -> int:
        return len(self)


# ------------------------------------------------------------- bit packing

def varint(n: int) -> bytes:
    """LEB128: 7 bits a byte (1 byte below 128, 2 below 16,384)."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(data: bytes) -> tuple[int, int]:
    """(value, bytes used)."""
    n = shift = 0
    for i, b in enumerate(data):
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i + 1
    raise LatentWireError("payload: truncated varint")


def pack_uints(values: np.ndarray, bits: int) -> bytes:
    """Unsigned integers < 2**bits, each in exactly `bits` bits, big-endian,
    concatenated; the last byte is zero-padded."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size and int(v.max()) >= (1 << bits):
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    b = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(b.reshape(-1)).tobytes()


def unpack_uints(data: bytes, bits: int, n: int) -> np.ndarray:
    b = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:n * bits].reshape(n, bits).astype(np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return (b << shifts).sum(axis=1).astype(np.int64)


def pack_rows(values: np.ndarray, bits: int) -> bytes:
    """[L, k] integers of `bits` bits each; prefixed with L as a varint when
    k * bits < 8 (then the padding could be mistaken for a position)."""
    L, k = values.shape
    head = varint(L) if k * bits < 8 else b""
    return head + pack_uints(values, bits)


def unpack_rows(data: bytes, bits: int, k: int) -> np.ndarray:
    if k * bits < 8:
        L, used = read_varint(data)
        data = data[used:]
    else:
        L = (len(data) * 8) // (k * bits)
    return unpack_uints(data, bits, L * k).reshape(L, k)


# ------------------------------------------------------------ text codecs

class TextCodec:
    """A lossless encoding of the context: encode -> bytes, decode -> ids."""
    name = "base"

    def encode(self, text: str, ids: Sequence[int]) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> list[int]:
        raise NotImplementedError

    # Several contexts at once: one by one here; a codec whose work batches
    # (the LLM-coded wire steps 8 contexts together) overrides the pair.
    def encode_many(self, items: Sequence[tuple[str, Sequence[int]]]) -> list[bytes]:
        """The payload of each (text, ids) pair (UTF-8 codecs need the text, id codecs the ids)."""
        return [self.encode(text, ids) for text, ids in items]

    def decode_many(self, datas: Sequence[bytes]) -> list[list[int]]:
        """The token ids of each payload."""
        return [self.decode(d) for d in datas]


class Utf8Codec(TextCodec):
    name = "utf8"

    def __init__(self, tokenize: Callable[[str], list[int]]):
        self.tokenize = tokenize  # the receiver's own: text -> the context's ids

    def encode(self, text, ids):
        return text.encode("utf-8")

    def decode(self, data):
        return self.tokenize(data.decode("utf-8"))


class ZstdCodec(Utf8Codec):
    """zstd at level 19, no dictionary, no frame checksum/size fields beyond zstd's defaults."""
    name = "zstd"

    def __init__(self, tokenize, level: int = 19):
        super().__init__(tokenize)
        import zstandard
        self._c = zstandard.ZstdCompressor(level=level)
        self._d = zstandard.ZstdDecompressor()

    def encode(self, text, ids):
        return self._c.compress(text.encode("utf-8"))

    def decode(self, data):
        return self.tokenize(self._d.decompress(data).decode("utf-8"))


class LzmaCodec(Utf8Codec):
    """lzma (xz format would add a 60-byte container; FORMAT_RAW keeps only the stream)."""
    name = "lzma"
    _FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]

    def encode(self, text, ids):
        return lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_RAW, filters=self._FILTERS)

    def decode(self, data):
        return self.tokenize(lzma.decompress(data, format=lzma.FORMAT_RAW, filters=self._FILTERS).decode("utf-8"))


class TokenIdCodec(TextCodec):
    """Token ids at ceil(log2 V) bits each (16 for SmolLM2's 49,152)."""
    name = "token_ids"

    def __init__(self, vocab_size: int):
        self.bits = max(1, math.ceil(math.log2(vocab_size)))

    def encode(self, text, ids):
        return pack_rows(np.asarray(ids, dtype=np.int64).reshape(-1, 1), self.bits)

    def decode(self, data):
        return unpack_rows(data, self.bits, 1).reshape(-1).tolist()


@contextlib.contextmanager
def torch_threads(k: int = 1):
    """torch on `k` CPU threads inside the block (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class LMArithmeticCodec(TextCodec):
    """The frozen LLM as the probability model of an arithmetic (range)
    coder: each context token is coded with p(token | head, earlier tokens),
    so the bytes approach the model's code length sum(-log2 p). Encoder and
    decoder compute the distributions by the same step-by-step forward passes
    with a KV cache, so their floating-point numbers are identical (a
    teacher-forced single pass can differ in the last bits and break
    decoding). A varint token count leads the payload. One LLM step per token
    each way.

    Both ends must compute bit-identical distributions, also in two processes
    (`latentwire send`, then `ask`): on the CPU the forward passes run on one
    thread, because a matrix product split over a different number of threads
    sums in another order and changes the last bits of the logits. The model
    file, library versions and CPU kind must match too, as for any LLM-coded
    text: with other numbers the decoder reads other tokens.

    Why `LANES`: a one-token step reads every weight of the model for one
    row, so on a CPU it is bound by memory, not arithmetic; stepping 8
    contexts together costs ~2x one (SmolLM2-135M, one thread: 0.14 s vs
    0.07 s a step), so `encode_many` / `decode_many` code 8 contexts in
    lockstep: 0.027-0.030 s a token per context on SQuAD paragraphs against
    0.072 one at a time (contexts of unequal length leave lanes idle). A matrix product with 1 or 2 rows takes
    another kernel than with 8 and its sums differ in the last bits, so every
    step runs exactly `LANES` rows, unused ones fed a filler token: a row's
    numbers then depend neither on which lane it sits in nor on the other
    rows (each output row of a product is its own dot products), and a
    payload coded among 7 others decodes alone (tested). The price: one
    context alone costs a full 8-row step.

    The integrity check: after the token count, `CHECK_BYTES` bytes of a
    hash of the coded ids (`ids_check`); the decoder hashes what it read and
    raises `IntegrityError` when they differ -- a payload read with other
    numbers (another model file, thread count, lane width, dtype, device,
    library) or with a corrupted byte fails loudly instead of decoding to
    fluent other text (a wrong read passes with probability 2**-16). The
    bytes are the payload's: they count in every table."""
    name = "lm_arithmetic"
    LANES = 8
    THREADS = 1
    """CPU threads of the coding passes (both ends must use the same: see above)."""
    CHECK_BYTES = 2

    def __init__(self, lm, head_ids: Sequence[int]):
        import constriction
        self.lm, self.head = lm, list(head_ids)
        self._model = constriction.stream.model.Categorical(perfect=False)
        self._c = constriction

    @torch.no_grad()
    def _lockstep(self, lengths: Sequence[int], pick: Callable[[int, int, np.ndarray], int]) -> None:
        """Steps the LLM over up to LANES contexts at once: lane j's i-th token
        (i < lengths[j]) is pick(j, i, p), where p is its distribution (float64
        numpy [V]) given the head and the lane's earlier tokens."""
        from ..llm.models import cache_kwarg, get_cache  # deferred: `import latentwire` loads no LLM code
        if len(lengths) > self.LANES:
            raise ValueError(f"at most {self.LANES} contexts step together")
        steps = max(lengths, default=0)
        if not steps:
            return
        model, kw, dev = self.lm.model, cache_kwarg(self.lm.model), self.lm.device
        out = model(input_ids=torch.tensor([self.head] * self.LANES, dtype=torch.long, device=dev), use_cache=True)
        filler = self.head[-1]
        for i in range(steps):
            logits = out.logits[:, -1].double()
            feed = [filler] * self.LANES
            for j, n in enumerate(lengths):
                if i < n:  # one row's softmax at a time: the same numbers whatever the other rows hold
                    feed[j] = int(pick(j, i, torch.softmax(logits[j], -1).cpu().numpy()))
            if i + 1 < steps:
                out = model(input_ids=torch.tensor(feed, dtype=torch.long, device=dev)[:, None], use_cache=True,
                            **{kw: get_cache(out)})

    def digest(self) -> str:
        """What the code's numbers depend on, as a digest: the model's weights and the prompt head it codes after
        (a payload's frame names it: `Pipeline.identity()["codec"]`)."""
        h = hashlib.sha256(self.lm.weights_digest().encode())
        h.update(np.asarray(self.head, dtype="<i4").tobytes())
        return h.hexdigest()[:32]

    def _threads(self):
        return torch_threads(self.THREADS) if self.lm.device.type == "cpu" else contextlib.nullcontext()

    def _chunks(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices in groups of LANES, longest first (contexts of similar length step together)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[s:s + self.LANES] for s in range(0, len(order), self.LANES)]

    def encode(self, text, ids):
        return self.encode_many([(text, ids)])[0]

    def decode(self, data):
        return self.decode_many([data])[0]

    def encode_many(self, items: Sequence[tuple[str, Sequence[int]]]) -> list[bytes]:
        """The payload of each (text, ids) context (the ids are coded), LANES at a time."""
        ids_list = [list(map(int, ids)) for _, ids in items]
        out: list[bytes] = [b""] * len(ids_list)
        with self._threads():
            for group in self._chunks([len(x) for x in ids_list]):
                encs = [self._c.stream.queue.RangeEncoder() for _ in group]

                def pick(j, i, p, group=group, encs=encs):
                    t = ids_list[group[j]][i]
                    encs[j].encode(np.array([t], dtype=np.int32), self._model, p[None, :])
                    return t
                self._lockstep([len(ids_list[g]) for g in group], pick)
                for g, enc in zip(group, encs):
                    out[g] = varint(len(ids_list[g])) + ids_check(ids_list[g]) + enc.get_compressed().tobytes()
        return out

    def parse(self, data: bytes) -> tuple[int, bytes, np.ndarray]:
        """(token count, check bytes, the range coder's words) of a payload; IntegrityError when it cannot be one."""
        try:
            n, used = read_varint(data)
        except LatentWireError:
            n, used = -1, 0
        check, words = data[used:used + self.CHECK_BYTES], data[used + self.CHECK_BYTES:]
        window = getattr(self.lm.model.config, "max_position_embeddings", None) or 1 << 20
        if n < 0 or len(check) < self.CHECK_BYTES or len(words) % 4 or len(self.head) + n > window:
            raise IntegrityError(f"payload of {len(data)} bytes is not an LLM-coded payload (corrupted, or made by "
                                 "another pipeline)")
        return n, check, np.frombuffer(words, dtype=np.uint32)

    def decode_many(self, datas: Sequence[bytes], verify: bool = True) -> list[list[int]]:
        """The token ids of each payload, LANES at a time; IntegrityError when one decodes to other ids than were
        coded (its check bytes say so). `verify=False`: the ids as read, unchecked (benchmarks/wire_robustness.py
        counts what the check catches; -1 where the coder refused the words)."""
        heads = [self.parse(bytes(d)) for d in datas]
        out: list[list[int]] = [[] for _ in datas]
        with self._threads():
            for group in self._chunks([n for n, _, _ in heads]):
                decs = [self._c.stream.queue.RangeDecoder(heads[g][2]) for g in group]

                def pick(j, i, p, group=group, decs=decs):
                    try:
                        t = int(decs[j].decode(self._model, p[None, :])[0])
                    except Exception:  # noqa: BLE001 -- constriction refuses words it cannot read: corrupted
                        t = -1
                    out[group[j]].append(t)
                    return t if t >= 0 else self.head[-1]
                self._lockstep([heads[g][0] for g in group], pick)
        for ids, (n, check, _) in zip(out, heads):
            if verify and ids_check(ids) != check:
                raise IntegrityError(INTEGRITY_MESSAGE)
        return out


INTEGRITY_MESSAGE = ("payload decoded to other tokens than were coded: the codec model's numbers differ from the "
                     "sender's (model file, thread count, lane width, dtype, device or library versions) or the "
                     "payload is corrupted")


class IntegrityError(LatentWireError):
    """An LLM-coded payload whose integrity check fails: never read as text (see LMArithmeticCodec)."""


def ids_check(ids: Sequence[int], nbytes: int = LMArithmeticCodec.CHECK_BYTES) -> bytes:
    """The integrity check of coded token ids: the first `nbytes` of blake2b over them as little-endian int32."""
    return hashlib.blake2b(np.asarray(list(ids), dtype="<i4").tobytes(), digest_size=nbytes).digest()


@torch.no_grad()
def lm_code_length_bits(lm, head_ids: Sequence[int], contexts: Sequence[Sequence[int]], batch_size: int = 8,
                        ) -> list[float]:
    """sum(-log2 p(token | head, earlier tokens)) for each context, from one
    teacher-forced forward pass per batch: the lossless floor for a sender
    and receiver that share this LLM (arithmetic coding reaches it to within
    a few bytes)."""
    out: list[float] = []
    head = list(head_ids)
    pad = lm.tokenizer.pad_token_id
    s = 0
    while s < len(contexts):
        # the logits are [B, T, V] floats: with a 262k vocabulary (Gemma-3) a batch of 8 long contexts is 4 GB,
        # so fewer rows go through at once there (SmolLM2's batches are unchanged)
        T = len(head) + max(len(c) for c in contexts[s:s + batch_size])
        rows = max(1, min(batch_size, LOGITS_BUDGET // (T * lm.vocab_size * 4)))
        chunk = [list(c) for c in contexts[s:s + rows]]
        s += len(chunk)
        T = len(head) + max(len(c) for c in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, c in enumerate(chunk):  # right padding: positions are 0.. as alone
            ids[i, :len(head) + len(c)] = torch.tensor(head + c)
            mask[i, :len(head) + len(c)] = 1
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits
        for i, c in enumerate(chunk):  # one row in float64 at a time (the same numbers as the whole batch)
            lo = len(head) - 1  # logits at position j predict token j + 1
            lp = torch.log_softmax(logits[i, lo:lo + len(c)].double(), -1)
            tgt = ids[i, lo + 1:lo + 1 + len(c), None].to(lm.device)
            out.append(float(-lp.gather(-1, tgt).sum()) / math.log(2))
        del logits
    return out


LOGITS_BUDGET = 2 ** 31
"""Bytes of float32 logits one forward of lm_code_length_bits may hold."""


# ------------------------------------------------------------ quantizers

class Quantizer:
    """Codes [N, k] (float) <-> the bytes of a payload. Fitted on training
    codes; what it learns (levels) is shared by both ends, never sent."""
    bits: int
    scheme: str

    def fit(self, z: torch.Tensor) -> "Quantizer":
        return self

    def to_bytes(self, z: torch.Tensor) -> bytes:
        raise NotImplementedError

    def from_bytes(self, data: bytes, k: int) -> torch.Tensor:
        raise NotImplementedError

    def roundtrip(self, z: torch.Tensor) -> torch.Tensor:
        """What the receiver gets back, as a tensor (no bytes): for
        diagnostics and training; equal to from_bytes(to_bytes(z)) (tested)."""
        raise NotImplementedError

    def state(self) -> dict:
        return {"bits": self.bits, "scheme": self.scheme}


class FloatQuantizer(Quantizer):
    """32: fp32 as computed; 16: IEEE half precision."""
    scheme = "float"

    def __init__(self, bits: int = 32):
        if bits not in (16, 32):
            raise LatentWireError(f"--bits {bits}: float codes are 16 or 32 bits")
        self.bits = bits
        self._np = np.float32 if bits == 32 else np.float16
        self._t = torch.float32 if bits == 32 else torch.float16

    def to_bytes(self, z):
        return z.detach().float().cpu().numpy().astype(self._np).tobytes()

    def from_bytes(self, data, k):
        return torch.from_numpy(np.frombuffer(data, dtype=self._np).astype(np.float32).reshape(-1, k).copy())

    def roundtrip(self, z):
        return z.to(self._t).to(z.dtype)


class ScalarQuantizer(Quantizer):
    """Per-dimension scalar quantization to 2**bits levels, fitted on
    training codes. `uniform`: evenly spaced levels over the dimension's
    [0.1%, 99.9%] quantile range (cell midpoints); `lloyd`: Lloyd-Max levels
    (1-D k-means, initialised at quantiles), which put levels where the codes
    are and lose less at 1-4 bits. Encoding is nearest level (deterministic:
    ties go to the lower level)."""

    def __init__(self, bits: int, scheme: str = "lloyd", iters: int = 30):
        if not 1 <= bits <= 8:
            raise LatentWireError(f"--bits {bits}: scalar quantization takes 1..8 bits (or 16, 32 as floats)")
        self.bits, self.scheme, self.iters = bits, scheme, iters

    def fit(self, z: torch.Tensor, max_rows: int = 200_000, seed: int = 0) -> "ScalarQuantizer":
        z = z.detach().float().cpu()
        if z.shape[0] > max_rows:
            z = z[torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]]
        n = 1 << self.bits
        zt = z.T.contiguous()  # [k, N]
        if self.scheme == "uniform":
            lo = torch.quantile(zt, 0.001, dim=1, keepdim=True)
            hi = torch.quantile(zt, 0.999, dim=1, keepdim=True)
            levels = lo + (hi - lo) * (torch.arange(n, dtype=torch.float32) + 0.5) / n
        elif self.scheme == "lloyd":
            q = (torch.arange(n, dtype=torch.float32) + 0.5) / n
            levels = torch.quantile(zt, q, dim=1).T.contiguous()  # [k, n]
            for _ in range(self.iters):
                idx = self._assign(zt, levels)
                s = torch.zeros_like(levels).scatter_add_(1, idx, zt)
                c = torch.zeros_like(levels).scatter_add_(1, idx, torch.ones_like(zt))
                levels = torch.where(c > 0, s / c.clamp_min(1), levels)
                levels, _ = levels.sort(dim=1)
        else:
            raise LatentWireError(f"--quantizer: unknown scheme {self.scheme!r}; choose uniform, lloyd")
        self.levels_ = levels.contiguous()  # [k, 2**bits], sorted per dimension
        return self

    @staticmethod
    def _assign(zt: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        mids = (levels[:, 1:] + levels[:, :-1]) / 2
        return torch.searchsorted(mids.contiguous(), zt.contiguous(), right=False)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """[N, k] level indices."""
        return self._assign(z.detach().float().cpu().T.contiguous(), self.levels_).T

    def dequantize(self, idx: torch.Tensor) -> torch.Tensor:
        return self.levels_.gather(1, idx.T.contiguous()).T.contiguous()

    def to_bytes(self, z):
        return pack_rows(self.indices(z).numpy(), self.bits)

    def from_bytes(self, data, k):
        return self.dequantize(torch.from_numpy(unpack_rows(data, self.bits, k)))

    def roundtrip(self, z):
        """Quantized values; with autograd on, gradients pass straight through
        (for training; the values then differ from the levels in the last bits)."""
        q = self.dequantize(self.indices(z)).to(z.device, z.dtype)
        return z + (q - z).detach() if z.requires_grad else q

    def state(self):
        return super().state() | {"levels_": self.levels_}


class RowQuantizer(Quantizer):
    """Each row (a vector) scaled by its own absolute maximum, sent as an fp16
    scale and `bits`-bit levels (2**bits uniform levels on [-max, max], cell
    midpoints): nothing fitted, so nothing shared but `bits`. For
    representations with no training distribution to fit levels on (a
    per-paragraph fit, a K/V cache). Bytes: a varint row count, 2 per row
    (the scales), then ceil(rows * k * bits / 8)."""
    scheme = "row-absmax"

    def __init__(self, bits: int):
        if not 1 <= bits <= 8:
            raise LatentWireError(f"row quantization takes 1..8 bits (got {bits})")
        self.bits = bits

    def _codes(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().float().cpu()
        scale = z.abs().amax(-1, keepdim=True).clamp_min(1e-8).half().float()
        n = 1 << self.bits
        idx = torch.floor((z / scale + 1) / 2 * n).clamp(0, n - 1).long()
        return idx, scale

    def _values(self, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        n = 1 << self.bits
        return (-1 + (2 * idx.float() + 1) / n) * scale

    def to_bytes(self, z):
        idx, scale = self._codes(z)
        return (varint(z.shape[0]) + scale.numpy().astype(np.float16).tobytes()
                + pack_uints(idx.numpy().reshape(-1), self.bits))

    def from_bytes(self, data, k):
        n_rows, a = read_varint(data)
        scale = torch.from_numpy(np.frombuffer(data[a:a + 2 * n_rows], dtype=np.float16).astype(np.float32).copy())
        idx = torch.from_numpy(unpack_uints(data[a + 2 * n_rows:], self.bits, n_rows * k)).view(n_rows, k)
        return self._values(idx, scale[:, None])

    def roundtrip(self, z):
        idx, scale = self._codes(z)
        q = self._values(idx, scale).to(z.device, z.dtype)
        return z + (q - z).detach() if z.requires_grad else q


def bounded_quantizer(bits: int, dim: int) -> Quantizer:
    """The wire's quantizer for tanh-bounded codes (the learned wires): 2**bits uniform levels on [-1, 1] (cell
    midpoints) per dimension; nothing to fit, so both ends know it from `bits` alone. 16/32 bits: floats."""
    if bits in (16, 32):
        return FloatQuantizer(bits)
    q = ScalarQuantizer(bits, "uniform")
    n = 1 << bits
    q.levels_ = (-1 + (2 * torch.arange(n, dtype=torch.float32) + 1) / n).repeat(dim, 1).contiguous()
    return q


def make_quantizer(bits: int, scheme: str = "lloyd") -> Quantizer:
    return FloatQuantizer(bits) if bits in (16, 32) else ScalarQuantizer(bits, scheme)


def quantizer_from_state(s: dict) -> Quantizer:
    if s["scheme"] == "float":
        return FloatQuantizer(s["bits"])
    q = ScalarQuantizer(s["bits"], s["scheme"])
    q.levels_ = s["levels_"]
    return q


# ------------------------------------------------------------- accounting

def wire_stats(sizes: Sequence[float], context_tokens: Sequence[int], positions: Sequence[int] | None = None) -> dict:
    """Bytes (and positions the receiver prefills) over distinct contexts,
    one payload each: mean, median, per context token."""
    b = np.asarray(sizes, dtype=np.float64)
    if not len(b):
        return {"contexts": 0}
    toks = float(sum(context_tokens))
    out = {"contexts": len(b), "bytes_mean": float(b.mean()), "bytes_median": float(np.median(b)),
           "bytes_per_token": float(b.sum() / max(toks, 1.0)), "bits_per_token": float(8 * b.sum() / max(toks, 1.0)),
           "context_tokens_mean": toks / len(b)}
    if positions is not None:
        out["positions_mean"] = float(np.mean(positions))
    return out


def text_references(lm, prompts, code_length: bool = True, ac_contexts: int = 0, batch_size: int = 8,
                    log=print) -> dict:
    """Bytes per context of every text reference on these prompts' contexts:
    UTF-8, zstd, lzma, token ids, the LLM's code length (bound) and its
    arithmetic coding (actual, on the first `ac_contexts` contexts, decoded
    and checked). `prompts`: data.Prompt objects (one reference per distinct
    context)."""
    ctx = distinct_contexts(prompts)
    ntok = [len(p.context_ids) for p in ctx]
    tokenize = lambda t: context_token_ids(lm.tokenizer, t)  # noqa: E731
    refs = {}
    codecs = [Utf8Codec(tokenize), LzmaCodec(tokenize), TokenIdCodec(lm.vocab_size)]
    try:
        codecs.insert(1, ZstdCodec(tokenize))
    except ImportError as e:  # a declared dependency; a bare GPU image may lack it: say so, measure the rest
        log(f"warning: {e}: the zstd reference is left out of this run's wire table")
    for codec in codecs:
        refs[codec.name] = wire_stats([len(codec.encode(p.context_text, p.context_ids)) for p in ctx], ntok)
    if code_length and ctx:
        head = ctx[0].head_ids
        bits = lm_code_length_bits(lm, head, [p.context_ids for p in ctx], batch_size=batch_size)
        refs["lm_code_length"] = wire_stats([b / 8 for b in bits], ntok) | {"bound": True}
        n_ac = min(ac_contexts, len(ctx))
        if n_ac:
            codec = LMArithmeticCodec(lm, head)
            want = [list(p.context_ids) for p in ctx[:n_ac]]
            datas = codec.encode_many([(p.context_text, w) for p, w in zip(ctx, want)])
            ok = sum(got == w for got, w in zip(codec.decode_many(datas), want))
            sizes = [len(d) for d in datas]
            refs["lm_arithmetic"] = wire_stats(sizes, ntok[:n_ac]) | {
                "decoded_exactly": ok, "bound_same_contexts_mean": sum(bits[:n_ac]) / 8 / n_ac}
            if ok != n_ac:
                log(f"warning: LLM arithmetic coding decoded {ok} of {n_ac} contexts exactly")
    return refs
