"""`halos eval preference`: how the model ranks held-out preference pairs.

The test split is tokenized exactly as training tokenized it (`halos.dataview.load_view` with the
run's own config), as pairs whatever the loss, so every model is scored on the same sequences and
the reference file's keys match. Reported for every model: the policy's own log-prob ranking
(`logp_accuracy`, `logp_margin`); with `--ref-logps`, the implicit rewards β·(log π − log π_ref)
of DPO-style losses (β from the model's loss_params, default 0.1). A reward model (loss `rm`)
reports its scores' ranking as `reward_*`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from halos.eval import models as minfo

# Summed log-probs of the same sequence computed in differently padded batches differ by float
# noise (~1e-6 nats); differences within this tolerance count as exactly 0 (a tie, not a win).
LOGP_TOLERANCE = 1e-4


def _snap(delta: float) -> float:
    return 0.0 if abs(delta) <= LOGP_TOLERANCE else delta


def train_config(info: dict, model: str | Path, data: str | Path, examples: int):
    """The run's TrainConfig (unknown keys of an older/newer summary ignored), pointed at `data`
    and limited to the first `examples` held-out rows (0 = all)."""
    from halos.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in info.get("config", {}).items() if k in fields}
    values.update(model=str(model), data=str(data), out=values.get("out") or "-",
                  eval_examples=int(examples))
    return TrainConfig(**values)


def _mean(values) -> float | None:
    values = list(values)
    return float(sum(values) / len(values)) if values else None


def preference_metrics(model_dir: str | Path, data: str | Path, *, ref_logps: str | None = None,
                       examples: int = 400, batch_size: int = 16) -> dict:
    from halos.train.reference import ReferenceLogps

    folder = minfo.model_folder(model_dir)
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data {str(data)!r}: not a prepared dataset folder")
    if examples < 0:
        raise ValueError(f"--examples must be >= 0, got {examples}")
    info = minfo.training_info(folder)
    name = minfo.loss_name(info)
    loss = _run_loss(name, info)
    cfg = train_config(info, folder, data, examples)
    reference = ReferenceLogps(ref_logps) if ref_logps else None
    view = _test_pairs(folder, cfg, loss, data)

    value_head = getattr(loss, "model_head", "causal_lm") == "value_head"
    chosen, rejected, ref_chosen, ref_rejected = _summed_scores(
        _scorer(folder, value_head), view, batch_size, None if value_head else reference)
    out: dict = {"n": len(chosen), "loss": name, "data": str(data),
                 "reward_accuracy": None, "reward_margin": None,
                 "chosen_reward": None, "rejected_reward": None, "beta": None}
    if value_head:  # a reward model: its scores are the rewards; it has no log-probs
        out.update(_reward_summary(chosen, rejected), logp_accuracy=None, logp_margin=None,
                   reward="value head score")
        return out
    out.update(logp_accuracy=_accuracy(chosen, rejected), logp_margin=_margin(chosen, rejected))
    if reference is not None:
        beta = minfo.beta(info)
        cr = [beta * _snap(p - q) for p, q in zip(chosen, ref_chosen, strict=True)]
        rr = [beta * _snap(p - q) for p, q in zip(rejected, ref_rejected, strict=True)]
        out.update(beta=beta, **_reward_summary(cr, rr),
                   reward="beta * (log pi - log pi_ref), summed log-probs",
                   ref_logps=str(ref_logps))
    return out


def _run_loss(name: str | None, info: dict):
    """The run's loss, which decides how the test split is tokenized; SFT's when the run names
    none or one this version cannot rebuild."""
    from halos.losses import build_loss, get_loss_class

    try:
        return build_loss(name, minfo.loss_params(info)) if name else get_loss_class("sft")()
    except (KeyError, ValueError):
        return get_loss_class("sft")()


def _test_pairs(folder: Path, cfg, loss, data: str | Path):
    from transformers import AutoTokenizer

    from halos.train.dataview import load_view

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    view = load_view(cfg, loss, tokenizer, "test", kind="paired", with_kl=False)
    if not len(view):
        raise ValueError(f"{data}/test.jsonl: no usable preference pairs")
    return view


def _scorer(folder: Path, value_head: bool):
    """The model as (input_ids, attention_mask, loss_mask) -> (per-sequence score, _), in eval
    mode: the value head's score for a reward model, else the summed log-prob."""
    import torch

    if value_head:
        from halos.models.value_head import ValueHeadModel

        module = ValueHeadModel.from_pretrained(folder, dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        from halos.train.logps import CausalLMLogps

        module = CausalLMLogps(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    module.eval()
    return module


def _summed_scores(scorer, view, batch_size: int, reference) -> tuple[list[float], ...]:
    """(chosen, rejected, reference chosen, reference rejected) scores of every pair; the
    reference lists stay empty without a reference."""
    import torch

    from halos.train.metrics import PROGRESS_EVERY_S, ProgressLines

    chosen, rejected, ref_chosen, ref_rejected = [], [], [], []
    starts = range(0, len(view), batch_size)
    lines = ProgressLines("eval preference", len(starts), PROGRESS_EVERY_S)
    with torch.no_grad():
        for done, start in enumerate(starts, 1):
            batch = view.batch(list(range(start, min(start + batch_size, len(view)))))
            sums, _ = scorer(batch.input_ids, batch.attention_mask, batch.loss_mask)
            b = batch.size  # a batch holds its b chosen sequences, then their b rejected ones
            chosen += sums[:b].double().tolist()
            rejected += sums[b:].double().tolist()
            if reference is not None:
                ref_sums, _ = reference.lookup(batch.keys)
                ref_chosen += ref_sums[:b].double().tolist()
                ref_rejected += ref_sums[b:].double().tolist()
            lines.update(done, {})
    return chosen, rejected, ref_chosen, ref_rejected


def _accuracy(chosen: list[float], rejected: list[float]) -> float | None:
    return _mean(c > r for c, r in zip(chosen, rejected, strict=True))


def _margin(chosen: list[float], rejected: list[float]) -> float | None:
    return _mean(c - r for c, r in zip(chosen, rejected, strict=True))


def _reward_summary(chosen: list[float], rejected: list[float]) -> dict:
    return {"reward_accuracy": _accuracy(chosen, rejected),
            "reward_margin": _margin(chosen, rejected),
            "chosen_reward": _mean(chosen), "rejected_reward": _mean(rejected)}
