"""Checkpoints that a crash never leaves looking complete, resume, and the final export.

    out/checkpoints/step_N/     DeepSpeed's checkpoint of optimizer step N (written as
                                step_N.partial/, renamed when every rank is done)
    out/checkpoints/latest      the tag of the newest complete one (replaced atomically)
    out/model/                  the consolidated Hugging Face folder (written atomically)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from halos.files import atomic_dir, atomic_file
from halos.train.distributed import barrier, is_main
from halos.train.engine import zero_stage

LATEST = "latest"
CHECKPOINTS = "checkpoints"


def save_checkpoint(engine, root: Path, step: int, client_state: dict[str, Any]) -> None:
    """Write checkpoint `step_N` so that a crash mid-write never looks complete.

    DeepSpeed writes into `step_N.partial/`; once every rank is done, rank 0 renames it and only
    then points `latest` at it (atomic rename). Older checkpoints are removed afterwards.
    """
    tag = f"step_{step}"
    partial = root / f"{tag}.partial"
    if is_main() and partial.exists():
        shutil.rmtree(partial)
    barrier()
    engine.save_checkpoint(str(root), tag=partial.name, client_state=client_state,
                           save_latest=False)
    barrier()
    if is_main():
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        with atomic_file(root / LATEST) as handle:
            handle.write(tag)
        for old in root.glob("step_*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def latest_checkpoint(root: Path) -> str | None:
    marker = root / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (root / tag).is_dir() else None


def load_checkpoint(engine, root: Path, tag: str) -> dict[str, Any]:
    _, client_state = engine.load_checkpoint(str(root), tag=tag)
    if client_state is None:
        raise RuntimeError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    return client_state


def resume_latest(engine, root: Path, fingerprint: str) -> dict[str, Any] | None:
    """Load the latest complete checkpoint under `root` and return its client state plus its
    "path" (None if there is none); refuse one saved by a run with other options, whose batches
    and schedule would not line up."""
    tag = latest_checkpoint(root)
    if tag is None:
        return None
    state = load_checkpoint(engine, root, tag)
    if state.get("fingerprint") != fingerprint:
        raise RuntimeError(
            f"{root / tag} belongs to a run with other options (or world size); "
            f"delete {root} to start over, or rerun with the original options")
    return {**state, "path": str(root / tag)}


def consolidated_state_dict(engine, ds: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere); gathers ZeRO-3 shards layer by layer."""
    if zero_stage(ds) == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if is_main() else None


def export_hf_folder(module: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None,
                     tokenizer, out: Path, extra_files: dict[str, dict] | None = None) -> None:
    """Rank 0 writes a `save_pretrained` folder (safetensors, tokenizer, generation config).

    `module` is the trained wrapper (log-prob or value-head model); it knows how to save itself.
    """
    if not is_main():
        return
    with atomic_dir(out) as tmp:
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
