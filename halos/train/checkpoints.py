"""Checkpoints that a crash never leaves looking complete, resume, and the final export.

    out/checkpoints/step_N/     DeepSpeed's checkpoint of optimizer step N (written as
                                step_N.partial/, renamed when every rank is done); the newest
                                only, or every one with --keep-checkpoints; the run's last step
                                is saved too, before the final export, so that a failed or
                                killed export is redone without retraining
    out/checkpoints/latest      the tag of the newest complete one (replaced atomically)
    out/model/                  the consolidated Hugging Face folder (written atomically)

A LoRA run's checkpoints hold only the trained parameters (adapters, value head) and their
optimizer state; the frozen base is loaded again from --model (halos/train/lora.py).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from halos.files import atomic_dir, atomic_file
from halos.train.distributed import barrier, is_main
from halos.train.engine import zero_stage
from halos.train.outdir import OutputError, first_error, free_mb, raise_on_any_rank, write_failure

LATEST = "latest"
CHECKPOINTS = "checkpoints"


def save_checkpoint(engine, root: Path, step: int, client_state: dict[str, Any],
                    keep_old: bool = False) -> None:
    """Write checkpoint `step_N` so that a crash mid-write never looks complete.

    DeepSpeed writes into `step_N.partial/`; once every rank is done, rank 0 renames it and only
    then points `latest` at it (atomic rename). Older checkpoints are removed afterwards unless
    `keep_old`. A write that fails (disk full, read-only) removes the partial, keeps the last
    complete checkpoint and raises a one-line OutputError on every rank.
    """
    tag = f"step_{step}"
    partial = root / f"{tag}.partial"
    if is_main() and partial.exists():
        shutil.rmtree(partial)
    barrier()
    error = write_failure(lambda: engine.save_checkpoint(
        str(root), tag=partial.name, client_state=client_state, save_latest=False,
        exclude_frozen_parameters=_frozen_base(engine)), root)
    if error is None:
        barrier()
        error = write_failure(lambda: _commit(root, tag, keep_old), root) if is_main() else None
    if error is not None:
        error = (f"could not write checkpoint {root / tag} ({error}; {free_mb(root)} MB free "
                 f"there); {_kept(root)}: free space and rerun the same command")
    error = first_error(error)
    if error is not None:
        if is_main():
            shutil.rmtree(partial, ignore_errors=True)
        raise OutputError(error)


def _frozen_base(engine) -> bool:
    """A LoRA run's checkpoints leave out the frozen base weights (reloaded from --model on
    resume): they hold the adapters, any value head and their optimizer state."""
    from halos.train.lora import has_adapters

    return has_adapters(engine.module)


def _commit(root: Path, tag: str, keep_old: bool) -> None:
    """Rename `tag.partial` to `tag`, point `latest` at it, drop older ones (unless kept)."""
    final = root / tag
    if final.exists():
        shutil.rmtree(final)
    os.replace(root / f"{tag}.partial", final)
    with atomic_file(root / LATEST) as handle:
        handle.write(tag)
    for old in root.glob("step_*"):
        if old.name != tag and not (keep_old and old.is_dir() and _step(old.name) is not None):
            shutil.rmtree(old, ignore_errors=True)


def _kept(root: Path) -> str:
    tag = latest_checkpoint(root)
    if tag is None:
        return "no complete checkpoint to resume from yet"
    return f"the last complete checkpoint {root / tag} is kept and resumed from"


def _step(name: str) -> int | None:
    """N of a complete checkpoint folder `step_N` (None for anything else)."""
    number = name.removeprefix("step_")
    return int(number) if name.startswith("step_") and number.isdigit() else None


def latest_checkpoint(root: Path) -> str | None:
    marker = root / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (root / tag).is_dir() else None


def resume_candidates(root: Path) -> list[str]:
    """Complete checkpoints to try, newest first: the one `latest` names, then older kept ones
    (written before it, so complete too)."""
    latest = latest_checkpoint(root)
    if latest is None:
        return []
    newest = _step(latest)
    older = sorted((p.name for p in root.glob("step_*") if p.is_dir()
                    and (n := _step(p.name)) is not None and newest is not None and n < newest),
                   key=_step, reverse=True)
    return [latest, *older]


def load_checkpoint(engine, root: Path, tag: str) -> dict[str, Any]:
    """The client state of checkpoint `tag`; an unreadable one (truncated, a shard missing)
    raises OutputError naming it, on every rank."""
    state, error = None, None
    try:
        _, state = engine.load_checkpoint(str(root), tag=tag,
                                          load_module_strict=not _frozen_base(engine))
        if state is None:
            error = "DeepSpeed found no loadable state in it"
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
        text = str(err).strip()  # torch's first sentence says what; the rest is advice
        error = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
    raise_on_any_rank(f"{root / tag} is unreadable ({error})" if error else None)
    return state


def resume_latest(engine, root: Path, fingerprint: str) -> dict[str, Any] | None:
    """Load the newest loadable complete checkpoint under `root` and return its client state
    plus its "path" (None if there is none). An unreadable one falls back to an older kept one
    (saying so); with none left, the error names the folder to delete. A checkpoint saved by a
    run with other options, whose batches and schedule would not line up, is refused."""
    candidates = resume_candidates(root)
    for index, tag in enumerate(candidates):
        try:
            state = load_checkpoint(engine, root, tag)
        except OutputError as err:
            if index + 1 == len(candidates):
                tried = ", ".join(candidates)
                raise OutputError(f"no checkpoint under {root} is readable ({tried}; the last: "
                                  f"{err}): delete {root} to start over") from err
            if is_main():
                print(f"[halos] checkpoint {err}; falling back to {root / candidates[index + 1]}",
                      flush=True)
            continue
        if state.get("fingerprint") != fingerprint:
            raise OutputError(
                f"{root / tag} belongs to a run with other options (or world size); "
                f"delete {root} to start over, or rerun with the original options")
        return {**state, "path": str(root / tag)}
    return None


def consolidated_state_dict(engine, ds: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere); gathers ZeRO-3 shards layer by layer."""
    if zero_stage(ds) == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if is_main() else None


def export_hf_folder(module: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None,
                     tokenizer, out: Path, extra_files: dict[str, dict] | None = None,
                     checkpoints: Path | None = None) -> None:
    """Rank 0 writes a `save_pretrained` folder (safetensors, tokenizer, generation config).

    `module` is the trained wrapper (log-prob or value-head model); it knows how to save itself.
    A failed write leaves nothing behind and raises a one-line OutputError on every rank that
    points at the resumable checkpoint under `checkpoints`.
    """
    error = None
    if is_main():
        error = write_failure(lambda: write_hf_folder(module, state_dict, tokenizer, out,
                                                       extra_files or {}), out.parent)
    if error is not None:
        error = (f"could not write the final model {out} ({error}; {free_mb(out)} MB free "
                 f"there); {_kept(checkpoints)}: free space and rerun the same command, which "
                 f"only saves again" if checkpoints else f"could not write {out} ({error})")
    raise_on_any_rank(error)


def write_hf_folder(module: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None,
                    tokenizer, out: Path, extra_files: dict[str, dict], **save_options) -> None:
    """`module.save_pretrained` (with `save_options`), the tokenizer and the JSON `extra_files`
    into `out`, atomically."""
    with atomic_dir(out) as tmp:
        module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, **save_options)
        tokenizer.save_pretrained(tmp)
        for name, payload in extra_files.items():
            (tmp / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
