"""Run-folder I/O: atomic writes, JSONL logs, seeding.

Every artifact is written to a temporary file in the same folder and then
renamed over the target, so a run killed at any moment leaves either the old
file or the new one, never a torn one.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import LatentWireError


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide artifacts from others


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and (obj != obj):  # NaN is not valid JSON
        return None
    return obj


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike, skip_bad: bool = False) -> list[dict]:
    """Rows of a JSONL file. A last line cut short by a kill (no newline, not
    JSON) is dropped with a warning; any other bad line is an error naming
    the file and line, or skipped with `skip_bad` (caches)."""
    import warnings

    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # the unterminated last line: a torn write
                warnings.warn(f"{path}: dropped a torn last line (a run was killed while writing it)")
            elif not skip_bad:
                raise LatentWireError(f"{path}: line {n} is not JSON") from None
    return rows


def drop_torn_tail(path: Path) -> bool:
    """Cut a file back to its last complete line (a kill can leave half a
    line); True when something was cut."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
        f.seek(0)
        f.truncate(data.rfind(b"\n") + 1)
    import warnings
    warnings.warn(f"{path}: dropped a torn last line (a run was killed while writing it)")
    return True


def safe_torch_load(path: str | os.PathLike, what: str) -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings, lists and
    dicts only. A pickle that would run code (or build any other object) is
    refused with an error naming `what` (the flag or file) -- loading a
    checkpoint from a user's path never executes what it contains."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on a bad file
        glob = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
        if glob:  # the pickle names a callable: code that would run on load
            raise LatentWireError(f"{what} {path}: refused: it holds objects other than tensors and plain data, "
                                  f"and loading them would run code ({glob[0][:120]})") from None
        raise LatentWireError(f"{what} {path}: not a LatentWire checkpoint ({type(e).__name__})") from None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class JsonlLogger:
    """Append-only JSONL log; one flushed line per event so `tail -f` works."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)  # appending after half a line would corrupt the next row too

    def log(self, **row: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")


class NullLogger:
    """A JsonlLogger that writes nothing: processes other than rank 0."""
    path = None

    def log(self, **row: Any) -> None:
        pass


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def content_key(*parts: Any) -> str:
    """sha256 (hex) of what made an entry: token id lists, strings, numbers, in order."""
    import hashlib
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, separators=(",", ":"), default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


class TensorStore:
    """Tensors computed once per content and kept: in memory, and (with a folder) in safetensors shards that the
    next run reads back (safetensors: nothing in them runs code). An entry is a dict of named tensors under a
    key that digests everything that made it (`content_key`), so a stored entry is used only where it would be
    computed the same. `flush` writes the entries added since the last flush as one new shard, atomically:
    a run killed mid-way keeps every shard it flushed, and the next one computes only what is missing."""

    def __init__(self, folder: str | os.PathLike | None):
        from safetensors.torch import load_file
        self.folder = None if folder is None else Path(folder)
        self.memo: dict[str, dict[str, torch.Tensor]] = {}
        self.pending: list[str] = []
        self.loaded = 0
        if self.folder is not None and self.folder.is_dir():
            for f in sorted(self.folder.glob("shard-*.safetensors")):
                try:
                    flat = load_file(str(f))
                except Exception:  # a foreign or torn file is skipped, its entries computed again
                    continue
                for name, t in flat.items():
                    key, _, part = name.partition("/")
                    self.memo.setdefault(key, {})[part] = t
            self.loaded = len(self.memo)

    def __contains__(self, key: str) -> bool:
        return key in self.memo

    def __len__(self) -> int:
        return len(self.memo)

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        return self.memo.get(key)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.memo[key] = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        self.pending.append(key)

    def flush(self) -> None:
        """Write the entries added since the last flush as one shard (nothing to do without a folder)."""
        if self.folder is None or not self.pending:
            self.pending = []
            return
        from safetensors.torch import save
        flat = {f"{k}/{n}": t for k in self.pending for n, t in self.memo[k].items()}
        name = f"shard-{content_key(sorted(self.pending))[:16]}.safetensors"
        atomic_write_bytes(self.folder / name, save(flat))
        self.pending = []


def write_section(path: str | os.PathLike, name: str, text: str) -> None:
    """Put `text` between `<!-- name: begin -->` and `<!-- name: end -->` in a
    Markdown file (the rest of the file -- prose written by hand -- is kept);
    a file without the markers gets them appended, a missing file is created."""
    path = Path(path)
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in old and end in old:
        a, b = old.index(begin), old.index(end) + len(end)
        new = old[:a] + block + old[b:]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    atomic_write_text(path, new)

