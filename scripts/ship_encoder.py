"""Ship a trained pooled LM encoder with the package: `--pipeline learned` (and `lw.load_pipeline("learned")`)
then loads it for the receiver it was trained on, with no folder and no training.

    python scripts/ship_encoder.py training/encoder-top2-r4 --name smollm2-135m-r4

Copies encoder.json + the safetensors it names (nothing else: the training record stays in the run folder) into
latentwire/shipped/NAME/, refusing a folder whose weights exceed 20 MB. The receiver is matched by the content
digest of its weights recorded in encoder.json, so the folder never loads onto another model.
"""
import argparse
import sys

from latentwire.encoder.weights import SHIP_LIMIT, ship
from latentwire.errors import LatentWireError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a train-encoder folder (encoder.json + safetensors)")
    ap.add_argument("--name", required=True, help="the shipped folder's name (latentwire/shipped/NAME)")
    ap.add_argument("--limit", type=int, default=SHIP_LIMIT, help="most bytes the weights may hold")
    a = ap.parse_args()
    try:
        out = ship(a.folder, a.name, a.limit)
    except LatentWireError as e:
        print(f"ship_encoder: error: {e}", file=sys.stderr)
        return 2
    print(f"shipped {a.folder} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
