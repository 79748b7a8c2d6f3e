"""LatentWire: can a frozen LLM still do its job when it reads a compressed
representation -- cheaper than its own text -- instead of its own input?

A pipeline is a sender (a paragraph -> a payload of exact bytes) and a
receiver (the payload -> what the frozen LLM reads where the paragraph was);
every pipeline is measured on the same questions, in bytes, against the text.

    import latentwire as lw
    pipe = lw.load_pipeline("truncate+ac", ratio=4)      # the default model, SmolLM2-135M-Instruct
    payload = pipe.send(paragraph)                        # bytes
    lw.ask(pipe, payload, "Who founded the company?")     # the frozen LLM's answer from the payload
    data = lw.wrap(pipe, payload)                         # a payload file's bytes: the payload in its frame

`latentwire pipelines` lists the kinds; your own pipeline subclasses
`latentwire.Pipeline` (implement `encode` and `decode`).
"""
__version__ = "0.2.0"

from .api import ask, evaluate, load_pipeline, unwrap, wrap  # noqa: E402
from .errors import LatentWireError  # noqa: E402
from .pipelines import KINDS, BuildContext, KVReading, Payload, Pipeline, check_pipeline  # noqa: E402

__all__ = ["BuildContext", "KINDS", "KVReading", "LatentWireError", "Payload", "Pipeline", "ask",
           "check_pipeline", "evaluate", "load_pipeline", "unwrap", "wrap", "__version__"]
