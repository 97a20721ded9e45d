"""The model card of a published run: `huggingface_hub`'s ModelCard/ModelCardData with the run's
base model, datasets, loss and hyperparameters, training config, suite, and its evaluation results
as `model-index` entries (lm-eval scores, judge win-rate vs SFT with its 90% CI, held-out
preference accuracy). Evaluation files that are missing are left out of the card.

The card is a pure function of its inputs (no dates), so re-publishing an unchanged run produces
a byte-identical README.md and therefore no commit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# Options of the run worth a row in the card's training table (the full config is in a <details>).
TRAINING_KEYS = ("learning_rate", "epochs", "max_steps", "micro_batch_size",
                 "gradient_accumulation_steps", "lr_schedule", "warmup_steps", "weight_decay",
                 "max_length", "max_prompt_length", "precision", "seed")
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "logp_accuracy", "logp_margin")


@dataclass(frozen=True)
class RunId:
    """Which run of a suite a model folder is: results/{suite}/{model}/{dataset}/{loss}/model."""

    model: str
    dataset: str
    loss: str
    suite: str | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, suite: str | None = None) -> RunId:
        parts = Path(folder).resolve().parts
        if len(parts) < 4 or parts[-1] != "model":
            raise ValueError(f"{folder}: not a results/MODEL/DATASET/LOSS/model folder; "
                             f"pass --run MODEL/DATASET/LOSS")
        return cls(parts[-4], parts[-3], parts[-2], suite)

    @classmethod
    def parse(cls, text: str, suite: str | None = None) -> RunId:
        parts = text.split("/")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"--run {text!r}: expected MODEL/DATASET/LOSS")
        return cls(*parts, suite)


@dataclass
class CardInputs:
    """Everything the card says, gathered from the model folder, its eval folder and the CLI."""

    repo_id: str
    run: RunId
    training: dict                    # halos_training.json ({} if absent)
    evals: dict[str, dict]            # {"judge": {...}, "preference": {...}, "lm_eval": {...}}
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    has_value_head: bool = False
    is_adapter: bool = False          # a LoRA adapter folder (adapter_config.json)
    prompt_suffix: str = ""
    has_chat_template: bool = True


def read_evals(eval_dir: str | Path) -> dict[str, dict]:
    """The eval JSONs present in `eval_dir` (judge, preference, lm_eval); missing ones are skipped."""
    out = {}
    for name in ("judge", "preference", "lm_eval"):
        path = Path(eval_dir) / f"{name}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from err
            if isinstance(data, dict):
                out[name] = data
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(f"{float(value):.6g}")


def eval_results(inputs: CardInputs) -> list[EvalResult]:
    """The model-index entries: judge win-rate (+ CI bounds), preference metrics, lm-eval scores."""
    dataset_id = inputs.datasets[0] if inputs.datasets else inputs.run.dataset
    results = _judge_results(inputs.evals.get("judge", {}), dataset_id, inputs.run.dataset)
    results += _preference_results(inputs.evals.get("preference", {}), dataset_id, inputs.run.dataset)
    results += _lm_eval_results(inputs.evals.get("lm_eval", {}))
    return results


def _judge_results(judge: dict, dataset_id: str, dataset: str) -> list[EvalResult]:
    rate = _number(judge.get("win_rate"))
    if rate is None:
        return []
    ci = judge.get("ci90") or [None, None]
    lo, hi = (_number(v) for v in ci[:2]) if len(ci) >= 2 else (None, None)
    note = f"{judge.get('judge', 'judge')} judge, n={judge.get('n')}"
    if lo is not None and hi is not None:
        note += f", 90% CI [{lo:.3f}, {hi:.3f}]"
    common = dict(task_type="text-generation", task_name="win rate vs the SFT model",
                  dataset_type=dataset_id, dataset_name=f"{dataset} held-out prompts")
    out = [EvalResult(metric_type="win_rate", metric_value=rate,
                      metric_name=f"win rate vs SFT ({note})", **common)]
    for bound, value in (("ci90_low", lo), ("ci90_high", hi)):
        if value is not None:
            out.append(EvalResult(metric_type=f"win_rate_{bound}", metric_value=value,
                                  metric_name=f"win rate vs SFT, 90% CI {bound[5:]}", **common))
    p_value = _number(judge.get("p_value"))
    if p_value is not None:
        out.append(EvalResult(metric_type="p_value", metric_value=p_value,
                              metric_name="p-value (win rate vs SFT = 0.5)", **common))
    return out


def _preference_results(pref: dict, dataset_id: str, dataset: str) -> list[EvalResult]:
    out = []
    for metric in PREFERENCE_METRICS:
        value = _number(pref.get(metric))
        if value is not None:
            out.append(EvalResult(task_type="text-classification",
                                  task_name="held-out preference pairs", dataset_type=dataset_id,
                                  dataset_name=f"{dataset} held-out pairs", metric_type=metric,
                                  metric_value=value, metric_name=metric.replace("_", " ")))
    return out


def _lm_eval_results(lm_eval: dict) -> list[EvalResult]:
    out = []
    for task, metrics in sorted((lm_eval.get("tasks") or {}).items()):
        for metric, value in sorted((metrics or {}).items()):
            number = _number(value)
            if number is None or "_stderr" in metric:
                continue
            stderr = _number(metrics.get(metric.replace(",", "_stderr,", 1) if "," in metric
                                         else f"{metric}_stderr"))
            name = f"{metric} (lm-eval)" + (f" ± {stderr:.4f}" if stderr is not None else "")
            out.append(EvalResult(task_type="text-generation", task_name=task, dataset_type=task,
                                  dataset_name=task, metric_type=metric, metric_value=number,
                                  metric_name=name))
    return out


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def card_data(inputs: CardInputs) -> ModelCardData:
    run, cfg = inputs.run, inputs.training.get("config", {})
    loss_class = inputs.training.get("loss") or cfg.get("loss") or run.loss
    tags = ["halos", "alignment", loss_class] + ([run.suite] if run.suite else [])
    if inputs.has_value_head:
        tags.append("reward-model")
    if inputs.is_adapter:
        tags.append("lora")
    results = eval_results(inputs)
    return ModelCardData(
        base_model=inputs.base_model, datasets=inputs.datasets or None, license=inputs.license,
        library_name="peft" if inputs.is_adapter else "transformers", pipeline_tag="text-generation", tags=list(dict.fromkeys(tags)),
        model_name=inputs.repo_id.split("/")[-1] if results else None,
        eval_results=results or None,
        halos={"suite": run.suite, "model": run.model, "dataset": run.dataset, "loss": run.loss,
               "loss_class": loss_class, "loss_params": cfg.get("loss_params") or {},
               "steps": inputs.training.get("steps"), "world_size": inputs.training.get("world_size")},
    )


def build_card(inputs: CardInputs) -> ModelCard:
    data = card_data(inputs)
    body = "\n".join([_summary(inputs), _training(inputs), _results(inputs), _usage(inputs)])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _summary(inputs: CardInputs) -> str:
    run = inputs.run
    suite = f" of the halos-factory suite `{run.suite}`" if run.suite else " (halos-factory)"
    start = inputs.training.get("config", {}).get("model")
    base = f"[{inputs.base_model}](https://huggingface.co/{inputs.base_model})" \
        if inputs.base_model else f"`{run.model}`"
    lines = [f"# {inputs.repo_id.split('/')[-1]}", "",
             f"`{run.model}` aligned with the **{run.loss}** loss on `{run.dataset}`: one run{suite}.",
             "", f"- base model: {base}"]
    if start:
        lines.append(f"- started from: `{start}`")
    if inputs.datasets:
        lines.append("- datasets: " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})"
                                                for d in inputs.datasets))
    if inputs.has_value_head:
        lines.append("- reward model: the value head is `value_head.safetensors` (TRL key names)")
    if inputs.is_adapter:
        lines.append("- a LoRA adapter (peft) on the base model: `PeftModel.from_pretrained("
                     "AutoModelForCausalLM.from_pretrained(base), repo)`, or "
                     "`AutoModelForCausalLM.from_pretrained(repo)` with peft installed")
    return "\n".join(lines) + "\n"


def _training(inputs: CardInputs) -> str:
    info, cfg = inputs.training, inputs.training.get("config", {})
    if not info:
        return "## Training\n\nNo `halos_training.json` in the model folder.\n"
    rows = [("loss", f"`{info.get('loss') or cfg.get('loss')}`")]
    rows += [(f"loss: {k}", f"`{v!r}`") for k, v in sorted((cfg.get("loss_params") or {}).items())]
    rows += [(k, f"`{cfg[k]!r}`") for k in TRAINING_KEYS if k in cfg]
    rows += [(k, f"`{info[k]!r}`") for k in ("steps", "world_size") if k in info]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    config = json.dumps(cfg, indent=2, sort_keys=True)
    return (f"## Training\n\n| option | value |\n|---|---|\n{table}\n\n<details><summary>Full "
            f"training config (halos_training.json)</summary>\n\n```json\n{config}\n```\n\n"
            f"</details>\n")


def _results(inputs: CardInputs) -> str:
    results = eval_results(inputs)
    if not results:
        return "## Evaluation\n\nNo evaluation results were available when this card was written.\n"
    rows = "\n".join(f"| {r.task_name} | {r.dataset_name} | {r.metric_name} | {r.metric_value:.4g} |"
                     for r in results)
    return f"## Evaluation\n\n| task | data | metric | value |\n|---|---|---|---|\n{rows}\n"


def _usage(inputs: CardInputs) -> str:
    if inputs.has_chat_template:
        prompt = ('messages = [{"role": "user", "content": "What is 2 plus 3?"}]\n'
                  'text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, '
                  'tokenize=False)\n')
    else:
        prompt = 'text = "Human: What is 2 plus 3?\\n\\nAssistant:"\n'
    if inputs.prompt_suffix:
        prompt += f"text += {inputs.prompt_suffix!r}  # the loss conditions on this control token\n"
    return ("## Usage\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{inputs.repo_id}")\n'
            f'model = AutoModelForCausalLM.from_pretrained("{inputs.repo_id}")\n'
            f"{prompt}"
            'inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)\n'
            "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
            'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], '
            "skip_special_tokens=True))\n```\n")
