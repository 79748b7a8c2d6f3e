"""Trained weights shipped with the package: `--pipeline learned` without a
folder loads the pooled LM encoder shipped for the receiver model, if one is
(`latentwire/shipped/<name>/`: encoder.json + safetensors, the same folder
`latentwire train-encoder` writes). A folder is matched to the receiver by
the content digest of the receiver's weights recorded in its encoder.json,
so it never loads onto another model."""
from __future__ import annotations

import json
from pathlib import Path

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
