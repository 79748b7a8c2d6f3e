"""Trained weights shipped with the package: `--pipeline learned` without a
folder loads the pooled LM encoder shipped for the receiver model, if one is
(`latentwire/shipped/<name>/`: encoder.json + safetensors, the same folder
`latentwire train-encoder` writes). A folder is matched to the receiver by
the content digest of the receiver's weights recorded in its encoder.json,
so it never loads onto another model."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import LatentWireError

SHIPPED = Path(__file__).parent.parent / "shipped"


def shipped_folders() -> list[Path]:
    """Every shipped encoder folder (complete: its encoder.json is written last)."""
    return sorted(p.parent for p in SHIPPED.glob("*/encoder.json")) if SHIPPED.is_dir() else []


def shipped_encoder(lm) -> Path | None:
    """The shipped encoder folder whose receiver has `lm`'s weights (by content digest), or None."""
    digest = None
    for folder in shipped_folders():
        meta = json.loads((folder / "encoder.json").read_text())
        digest = digest or lm.weights_digest()
        if meta.get("receiver", {}).get("weights") == digest:
            return folder
    return None


SHIP_LIMIT = 20_000_000
"""Bytes a shipped folder may hold: the package stays installable from a wheel an index accepts."""


def ship(src: str | Path, name: str, limit: int = SHIP_LIMIT, dest: Path | None = None) -> Path:
    """Copy a train-encoder folder's weights (encoder.json + its safetensors, nothing else) into the package as
    `shipped/<name>/`, replacing a folder of that name. Checked first (one-line errors): the folder is a trained
    encoder's, its files fit in `limit` bytes. Atomic: written beside, then renamed; encoder.json is copied last,
    so a half-copied folder is never listed."""
    from .lmenc import read_meta  # lmenc loads torch; listing the shipped folders does not
    meta = read_meta(src, flag="ship")
    if not name or "/" in name or name.startswith("."):
        raise LatentWireError(f"ship --name {name!r}: a folder name (no '/', not hidden)")
    size = sum((Path(src) / f).stat().st_size for f in meta["files"])
    if size > limit:
        raise LatentWireError(f"ship {src}: its weights are {size:,} bytes, over the {limit:,} a shipped folder may "
                              f"hold (fewer tuned blocks, or --enc-save-dtype bfloat16)")
    dest = Path(dest) if dest is not None else SHIPPED
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the package's data from other users of an install
    try:
        for f in meta["files"]:
            shutil.copyfile(Path(src) / f, tmp / f)
        shutil.copyfile(Path(src) / "encoder.json", tmp / "encoder.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-copied is left beside the shipped folders
        raise
    final = dest / name
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=dest))
        os.replace(final, old / name)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final
