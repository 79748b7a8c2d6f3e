"""Trained weights shipped with the package (none yet): `--pipeline learned`
without a run folder loads the compressor shipped for the receiver model, if
one is; see README "Using it"."""
from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).parent / "shipped"


def shipped_compressor(lm) -> Path | None:
    """The shipped seq_compressor.pt whose receiver has `lm`'s weights (by content digest), or None."""
    if not SHIPPED.is_dir():
        return None
    digest = lm.weights_digest()
    for meta in sorted(SHIPPED.glob("*/meta.json")):
        import json
        m = json.loads(meta.read_text())
        if m.get("weights") == digest and (meta.parent / "seq_compressor.pt").is_file():
            return meta.parent / "seq_compressor.pt"
    return None
