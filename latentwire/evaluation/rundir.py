"""Run folders: what a run leaves, when a finished one may be reused, and
how a folder that already holds a run is protected (--resume / --overwrite).

A finished run is reused only when its resolved config equals the one
requested, field for field (`config_diff`), except the fields that change
neither an answer nor a weight (NOT_COMPARED); data files are compared as
files, however their paths are spelled.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from ..config import RunConfig
from ..errors import LatentWireError
from ..util.runio import write_json, write_jsonl


def write_predictions(out: Path, stem: str, rows: list[dict]) -> None:
    """One row per question (`stem`.jsonl) and the official SQuAD v1.1
    prediction file (`stem`.official.json: {question id: answer}), which the
    official evaluation script scores as is."""
    write_jsonl(out / f"{stem}.jsonl", rows)
    write_json(out / f"{stem}.official.json", {r["id"]: r["prediction"] for r in rows})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# what a run leaves that a later --resume would read: --overwrite removes all of it
RUN_STATE_FILES = ("ckpt.pt", "ckpt_phase2.pt", "train_log.jsonl", "events.jsonl", "adapter_best_state.pt",
                   "adapter_phase2_state.pt", "metrics.json", "ckpt_seq.pt", "seq_train_log.jsonl", "opt_fits.jsonl")


def config_diff(out: Path, config: RunConfig, saved: dict | None = None) -> list[str]:
    """Fields whose value differs between the run saved in `out` (its
    config.json, or `saved`) and `config`, as 'field is X there but Y now';
    [] when none or when nothing is saved."""
    if saved is None:
        if not (out / "config.json").exists():
            return []
        saved = json.loads((out / "config.json").read_text())
    flat = _same_paths(_flatten(saved))
    now = _same_paths(_flatten(json.loads(json.dumps(asdict(config)))))
    return [f"{k} is {flat.get(k)!r} there but {now.get(k)!r} now" for k in sorted(set(flat) | set(now))
            if k not in NOT_COMPARED and flat.get(k) != now.get(k)]


# Data files named by path: one file spelled relative or absolute is one value (a relative spelling in a saved
# config is read against the working directory of the run that saved it, which config.json does not record, so
# both sides are resolved against the current one -- what a rerun from here would read).
PATH_FIELDS = ("data.squad_train", "data.squad_eval")


def _same_paths(flat: dict) -> dict:
    return {k: (os.path.realpath(v) if k in PATH_FIELDS and isinstance(v, str) and v != "hub" else v)
            for k, v in flat.items()}


# Fields that change neither an answer nor a trained weight: progress bars; `out`, the folder the saved config
# was read from, however it is spelled (relative or absolute); the learned compressor's reference losses, measured
# beside training without touching its random streams (a run saved before the field existed is still the same run).
NOT_COMPARED = ("progress", "out", "seq.seq_ref_questions")


def finished_metrics(cfg: RunConfig) -> tuple[dict | None, str]:
    """A finished run's metrics, to be reused only when the run's resolved
    config equals `cfg` (every field: data, questions, epochs, bits, ...);
    else (None, why not)."""
    mpath = Path(cfg.out) / "metrics.json"
    if not mpath.exists():
        return None, "not run yet"
    try:
        m = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return None, "its metrics.json is unreadable"
    cfg.validate()  # resolve what validate() fills in (steps_per_epoch), as the run did
    diff = config_diff(Path(cfg.out), cfg, saved=m.get("config") or {})
    return (m, "") if not diff else (None, f"{len(diff)} field(s) differ; first: {diff[0]}")


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, config: RunConfig | None = None,
                    main: bool = True) -> None:
    """Never silently mix or destroy runs: a folder that already holds a run
    needs --resume (continue it) or --overwrite (start over)."""
    held = [f for f in ("ckpt.pt", "metrics.json", "train_log.jsonl") if (out / f).exists()]
    if held and not (resume or overwrite):
        raise LatentWireError(f"--out {out}: already holds a run ({', '.join(held)}); "
                              "pass --resume to continue it or --overwrite to start over")
    if resume and not (out / "ckpt.pt").exists():
        raise LatentWireError(f"--resume: {out} has no ckpt.pt to resume from")
    if resume and config is not None:
        diff = config_diff(out, config)
        if diff:
            raise LatentWireError(f"--resume: the flags differ from the run being resumed ({len(diff)} field(s)); "
                                  f"first: {diff[0]}")
    if not main:  # every rank checks; one rank cleans and creates
        return
    try:
        if overwrite and not resume:
            for f in RUN_STATE_FILES:
                (out / f).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LatentWireError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__})") from None
