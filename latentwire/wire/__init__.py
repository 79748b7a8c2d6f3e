"""What crosses the wire, below any pipeline: the payload type, the quantizers, the text references and the LLM
arithmetic coder, token-id and UTF-8 codecs (wire.py), and Stage 1's PCA compressor and its artifact (compress.py).
The payload file's frame, which labels a payload with the registry's kinds, lives with the registry
(latentwire/pipelines/frame.py).

May import: latentwire.llm, latentwire.util, latentwire.data, latentwire.errors.
Imported by: latentwire.pipelines and everything above it (stage1, encoder, evaluate, api, cli).
"""
