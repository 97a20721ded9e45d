"""`halos ref-logps`: score every sequence any loss may need with the reference model, once per
(model, dataset); every alignment job on that data then reads the file (halos/train/reference.py)
instead of loading a reference model."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from halos.config import ConfigError, TrainConfig
from halos.train import engine as eng
from halos.train.batching import collate
from halos.train.dataview import holds_pairs, load_view
from halos.train.distributed import barrier, init_distributed
from halos.train.logps import CausalLMLogps
from halos.train.metrics import ProgressLines
from halos.train.outdir import free_bytes, free_mb, raise_on_any_rank, write_failure
from halos.train.packing import shared_prompt_units
from halos.train.reference import model_identity, write_reference_file
from halos.train.session import check_fits, claim_output


def reference_logps(cfg: TrainConfig) -> Path:
    """Score every sequence any loss may need on `cfg.data` with the reference model, once."""
    cfg.validate()
    out = Path(cfg.out)
    _refuse_existing(out, cfg)
    rank, world = init_distributed()
    lock = claim_output(out, rank, is_file=True)  # before any scoring: writable, not in use
    _refuse_existing(out, cfg)
    ds = eng.deepspeed_config(cfg)
    model, tokenizer = eng.load_causal_lm(cfg.model, ds, attn_implementation=cfg.attn_implementation)
    check_fits(model, cfg)
    sequences = reference_sequences(cfg, tokenizer)
    raise_on_any_rank(_no_room(out, sequences) if rank == 0 else None)
    engine = eng.build_engine(CausalLMLogps(model, cfg.logits_chunk_size, token_level=True), ds,
                              None)
    gathered = score_sequences(engine, sequences, tokenizer.pad_token_id, cfg, rank, world)
    raise_on_any_rank(_write(out, cfg, gathered) if rank == 0 else None)
    barrier()
    if lock is not None:
        lock.release()
    return out


IN_RUN_FILE = "ref_logps.pt"  # under an align run's --out, when it is given no --ref-logps


def reference_in_run(engine, cfg: TrainConfig, views: list, rank: int, world: int,
                     path: Path) -> None:
    """Without --ref-logps: this run's sequences scored by its own engine before the first step,
    while the policy still is the reference (the initial --model), into `path` (the format of
    `halos ref-logps`). Call it before resuming from a checkpoint."""
    engine.eval()
    gathered = score_sequences(engine, unique_sequences(views), views[0].pad_id, cfg, rank, world)
    raise_on_any_rank(_write(path, cfg, gathered) if rank == 0 else None)
    barrier()


def score_sequences(engine, sequences: list[tuple[list[int], list[int]]], pad_id: int,
                    cfg: TrainConfig, rank: int, world: int) -> list | None:
    """Every rank's (keys, sums, counts, per-token log-probs or None) per batch, on rank 0
    (None elsewhere), scored by `engine` without gradient in batches of 2 × micro batch.

    `engine` returns the (N, T-1) grid and mask of per-token log-probs (a token-level module),
    or per-sequence (sums, counts): then the file holds no per-token log-probs.
    """
    order = scoring_order(sequences, cfg.packing)
    size = cfg.micro_batch_size * 2
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    rounds = -(-len(chunks) // world)  # the same count on every rank (ZeRO-3 gathers weights)
    results: list[tuple[torch.Tensor, ...]] = []
    lines = ProgressLines("ref-logps", rounds, cfg.progress_every) if rank == 0 else None
    with torch.no_grad():
        for r in range(rounds):
            i = r * world + rank
            indices = chunks[min(i, len(chunks) - 1)]
            batch = collate([sequences[j] for j in indices], pad_id, "sft", 0,
                            packing=cfg.packing)
            args, kwargs = batch.engine_inputs(engine.device)
            scores, counts_or_mask, *_ = engine(*args, **kwargs)
            if i < len(chunks):
                results.append((batch.keys, *_per_sequence(scores.float().cpu(),
                                                           counts_or_mask.cpu())))
            if lines is not None:  # the job's log: a line every --progress-every seconds
                lines.update(r + 1, {})
    return [results] if world == 1 else _gather(results, world)


def _per_sequence(scores: torch.Tensor, counts_or_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(sums, counts, flat per-token log-probs row after row or None) of one scored batch."""
    if scores.dim() == 1:
        return scores, counts_or_mask, None
    return scores.sum(-1), counts_or_mask.sum(-1), scores[counts_or_mask]


def scoring_order(sequences: list[tuple[list[int], list[int]]], packing: bool) -> list[int]:
    """Longest first, for fixed-size batches dealt round-robin (all ranks run the same count);
    with packing, the sequences of one prompt next to each other, so that batches share it."""
    if not packing:
        return sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    units = sorted(shared_prompt_units(sequences), key=len, reverse=True)
    return [row for unit in units for row in unit.rows]


def _no_room(out: Path, sequences: list[tuple[list[int], list[int]]]) -> str | None:
    """Why the file cannot fit where it goes (None if it can): checked before any scoring. Per
    sequence a key, sum, count and offset; per scored token a float32."""
    need = 24 * len(sequences) + 4 * sum(len(response) for _, response in sequences) + (1 << 16)
    if free_bytes(out.parent) >= need:
        return None
    return (f"--out {out}: {free_bytes(out.parent) >> 10} KB free there, the reference log-probs "
            f"of {len(sequences)} sequences need about {need >> 10} KB; free space or choose "
            f"another --out")


def _refuse_existing(out: Path, cfg: TrainConfig) -> None:
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to recompute")


def _write(out: Path, cfg: TrainConfig, gathered: list) -> str | None:
    """Write the file from every rank's results (rank 0); why it could not, or None."""
    keys, sums, counts, token_logps = _merge(gathered)
    error = write_failure(lambda: write_reference_file(
        out, keys, sums, counts, model=cfg.model, identity=model_identity(cfg.model),
        data_fingerprint=_fingerprint(keys), token_logps=token_logps), out.parent)
    if error is not None:
        return (f"could not write {out} ({error}; {free_mb(out.parent)} MB free there); "
                f"nothing was written: free space and rerun the same command")
    print(f"[halos] wrote reference log-probs of {len(keys)} sequences to {out}", flush=True)
    return None


def reference_sequences(cfg: TrainConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The union of sequences the paired and unpaired (with KL pairs) views of the data score."""
    from halos.losses import get_loss_class

    probe = get_loss_class("sft")()  # only for prompt suffixes (none) when building views
    cfg = dataclasses.replace(cfg, eval_examples=0)  # every held-out row: runs may use any prefix
    paired = holds_pairs(Path(cfg.data) / "train.jsonl", cfg)
    views = _choices(cfg.ref_views, {"paired", "unpaired"}, "--ref-views")
    kinds = [k for k in ("paired", "unpaired") if k in views and (paired or k != "paired")]
    splits = [split for split in _choices(cfg.ref_splits, {"train", "test"}, "--ref-splits")
              if (Path(cfg.data) / f"{split}.jsonl").is_file()]
    return unique_sequences(load_view(cfg, probe, tokenizer, split, kind=kind,
                                      with_kl=kind == "unpaired")
                            for split in splits for kind in kinds)  # one view at a time


def unique_sequences(views: Iterable) -> list[tuple[list[int], list[int]]]:
    """Each distinct (prompt, response) the views score, in first-seen order (None: no view)."""
    unique = dict.fromkeys((tuple(p), tuple(r)) for view in views if view is not None
                           for p, r in view.sequences())
    return [(list(p), list(r)) for p, r in unique]


def _choices(value: str, allowed: set[str], option: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(chosen) - allowed)
    if unknown or not chosen:
        raise ConfigError(f"{option} {value!r}: choose a comma-separated subset of {sorted(allowed)}")
    return chosen


def _gather(results: list, world: int) -> list | None:
    """Every rank's results on rank 0 (None elsewhere): the per-token log-probs are large."""
    gathered: list | None = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(results, gathered, dst=0)
    return gathered


def _merge(gathered: list) -> tuple[torch.Tensor | None, ...]:
    """Concatenate each field of the (keys, sums, counts, token log-probs) of every batch; the
    last is None where the batches hold no per-token log-probs."""
    batches = [batch for results in gathered for batch in results]
    return tuple(None if field[0] is None else torch.cat(field)
                 for field in zip(*batches, strict=True))


def _fingerprint(keys: torch.Tensor) -> str:
    return hashlib.sha256(torch.sort(keys).values.numpy().tobytes()).hexdigest()[:32]
