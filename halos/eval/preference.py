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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from halos.dataview import load_view
    from halos.losses import build_loss, get_loss_class
    from halos.ops import CausalLMLogps
    from halos.reflogps import ReferenceLogps

    folder = minfo.model_folder(model_dir)
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data {str(data)!r}: not a prepared dataset folder")
    if examples < 0:
        raise ValueError(f"--examples must be >= 0, got {examples}")
    info = minfo.training_info(folder)
    name = minfo.loss_name(info)
    try:
        loss = build_loss(name, minfo.loss_params(info)) if name else get_loss_class("sft")()
    except (KeyError, ValueError):
        loss = get_loss_class("sft")()
    cfg = train_config(info, folder, data, examples)
    reference = ReferenceLogps(ref_logps) if ref_logps else None

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    view = load_view(cfg, loss, tokenizer, "test", kind="paired", with_kl=False)
    if not len(view):
        raise ValueError(f"{data}/test.jsonl: no usable preference pairs")

    value_head = getattr(loss, "model_head", "causal_lm") == "value_head"
    if value_head:
        from halos.value_head import ValueHeadModel

        module = ValueHeadModel.from_pretrained(folder, dtype=torch.float32)
    else:
        module = CausalLMLogps(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    module.eval()
    chosen, rejected, ref_chosen, ref_rejected = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(view), batch_size):
            batch = view.batch(list(range(start, min(start + batch_size, len(view)))))
            sums, _ = module(batch.input_ids, batch.attention_mask, batch.loss_mask)
            b = batch.size
            chosen += sums[:b].double().tolist()
            rejected += sums[b:].double().tolist()
            if reference is not None and not value_head:
                ref_sums, _ = reference.lookup(batch.keys)
                ref_chosen += ref_sums[:b].double().tolist()
                ref_rejected += ref_sums[b:].double().tolist()

    pairs = list(zip(chosen, rejected, strict=True))
    out: dict = {"n": len(pairs), "loss": name, "data": str(data),
                 "reward_accuracy": None, "reward_margin": None,
                 "chosen_reward": None, "rejected_reward": None, "beta": None}
    if value_head:  # a reward model: its scores are the rewards; it has no log-probs
        out.update(reward_accuracy=_mean(c > r for c, r in pairs),
                   reward_margin=_mean(c - r for c, r in pairs),
                   chosen_reward=_mean(chosen), rejected_reward=_mean(rejected),
                   logp_accuracy=None, logp_margin=None, reward="value head score")
        return out
    out.update(logp_accuracy=_mean(c > r for c, r in pairs),
               logp_margin=_mean(c - r for c, r in pairs))
    if reference is not None:
        beta = minfo.beta(info)
        cr = [beta * _snap(p - q) for p, q in zip(chosen, ref_chosen, strict=True)]
        rr = [beta * _snap(p - q) for p, q in zip(rejected, ref_rejected, strict=True)]
        out.update(beta=beta, reward_accuracy=_mean(c > r for c, r in zip(cr, rr, strict=True)),
                   reward_margin=_mean(c - r for c, r in zip(cr, rr, strict=True)),
                   chosen_reward=_mean(cr), rejected_reward=_mean(rr),
                   reward="beta * (log pi - log pi_ref), summed log-probs",
                   ref_logps=str(ref_logps))
    return out
