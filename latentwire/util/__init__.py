"""Low-level utilities with no LatentWire logic: run files written atomically and JSONL logs (runio.py), and the
torch.distributed setup for torchrun (dist.py).

May import: latentwire.errors only (and the standard library, torch).
Imported by: every layer above it (llm, wire, pipelines, stage1, encoder, evaluate, the root's api/cli).
"""
