"""`halos eval lm-eval`: lm-evaluation-harness on a saved checkpoint, offline when it can be.

Tasks are hub/registry names (arc_easy, hellaswag, gsm8k, mmlu, …) or local task YAML files.
A local YAML is loaded here (its `include:` and `!function` resolved by lm-eval's own loader),
its relative `dataset_kwargs.data_files` (and a relative local `dataset_path`) are rewritten to
absolute paths against the YAML's folder, and the resulting dict is what lm-eval receives; so a
task runs the same from any working directory. When every task is local, the task index skips
lm-eval's ~15k built-in tasks (`include_defaults=False`) and the Hub offline flags are forced.

With `--apply-chat-template` the model's chat template (the run's `chat_template` if it set one)
renders each prompt as a user turn, followed by the loss's sampling suffix (CSFT's `<|good|>`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from halos.eval import models as minfo

YAML_SUFFIXES = (".yaml", ".yml")
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_local_task(spec: str) -> bool:
    return Path(spec).suffix in YAML_SUFFIXES


def split_tasks(tasks: str | list[str]) -> list[str]:
    specs = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    specs = [t for t in specs if t]
    if not specs:
        raise ValueError("--tasks is empty; give task names or task YAML files, comma-separated")
    return specs


def _absolute(value, base: Path):
    """Rewrite relative local paths (str, list or dict of them) to absolute against `base`."""
    if isinstance(value, str):
        if "://" in value or Path(value).is_absolute():
            return value
        return str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    return value


def load_task_yaml(path: str | Path) -> dict:
    """A local task YAML as a config dict with data paths resolved against its folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {str(path)!r}: no such file")
    config = load_yaml(path, resolve_func=True)
    if "task" not in config:
        raise ValueError(f"{path}: a local task YAML needs a `task:` name (groups are not "
                         f"supported as files; list their tasks)")
    base = path.resolve().parent
    kwargs = dict(config.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _absolute(kwargs["data_files"], base)
        config["dataset_kwargs"] = kwargs
        missing = [f for f in _flatten(kwargs["data_files"]) if "://" not in f
                   and not any(ch in f for ch in "*?[") and not Path(f).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: data file(s) {missing} do not exist (paths are "
                                    f"relative to the YAML's folder)")
    dataset_path = config.get("dataset_path")
    if isinstance(dataset_path, str) and (base / dataset_path).exists():
        config["dataset_path"] = str((base / dataset_path).resolve())
    return config


def _flatten(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    return []


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (int, float)):
        return value
    return None  # "N/A" stderr strings and the like


def tidy_results(results: dict) -> dict[str, dict[str, float | None]]:
    """{task: {metric: value}} from lm-eval's "metric,filter" keys: the filter name is dropped
    where a metric has only one filter, kept ("metric,filter") where it has several."""
    out: dict[str, dict[str, float | None]] = {}
    for task, values in (results.get("results") or {}).items():
        keyed = [(k.split(",", 1)[0], k.split(",", 1)[1] if "," in k else "none", v)
                 for k, v in values.items() if k not in ("alias", "name", "sample_len")]
        filters: dict[str, set[str]] = {}
        for metric, flt, _ in keyed:
            filters.setdefault(metric, set()).add(flt)
        out[task] = {(metric if len(filters[metric]) == 1 else f"{metric},{flt}"): _clean(v)
                     for metric, flt, v in keyed}
    return out


def run_lm_eval(model_dir: str | Path, tasks: str | list[str], *, apply_chat_template: bool = False,
                limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = None,
                seed: int = 0, device: str | None = None) -> dict:
    folder = minfo.model_folder(model_dir)
    specs = split_tasks(tasks)
    all_local = all(is_local_task(s) for s in specs)
    if all_local:
        for flag in OFFLINE_FLAGS:
            os.environ[flag] = "1"
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    configs = [load_task_yaml(s) if is_local_task(s) else s for s in specs]

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    tokenizer, suffix = _eval_tokenizer(folder, minfo.training_info(folder), apply_chat_template)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = lm_eval.simple_evaluate(
        model=_harness_model(folder, tokenizer, batch_size, device), tasks=configs,
        task_manager=TaskManager(include_defaults=not all_local), limit=limit,
        num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, log_samples=False,
        bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed)
    if results is None:  # a non-zero rank of a distributed run
        return {}
    return {
        "tasks": tidy_results(results),
        "config": {
            "model": str(model_dir), "tasks": specs, "apply_chat_template": apply_chat_template,
            "prompt_suffix": suffix, "limit": limit, "batch_size": batch_size,
            "num_fewshot": num_fewshot, "seed": seed, "device": device,
            "n_samples": results.get("n-samples"),
            "versions": results.get("versions"),
            "lm_eval_version": getattr(lm_eval, "__version__", None),
            "offline": all_local,
        },
    }


def _eval_tokenizer(folder: Path, info: dict, apply_chat_template: bool):
    """The checkpoint's tokenizer (with a pad token) and the prompt suffix its chat template
    ends with ("" without --apply-chat-template)."""
    from transformers import AutoTokenizer

    from halos.data.tokenize import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not apply_chat_template:
        return tokenizer, ""
    template = resolve_chat_template(minfo.chat_template(info)) or tokenizer.chat_template
    if template is None:
        raise ValueError(f"--apply-chat-template: {folder} has no chat template (neither the "
                         f"tokenizer nor halos_training.json sets one)")
    suffix = minfo.prompt_suffix(info)
    if suffix:  # CSFT: condition on the good token, as at sampling time
        template += "{% if add_generation_prompt %}" + suffix + "{% endif %}"
    tokenizer.chat_template = template
    return tokenizer, suffix


def _harness_model(folder: Path, tokenizer, batch_size: int, device: str):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(folder), tokenizer=tokenizer, batch_size=batch_size, device=device,
              dtype="float32" if device == "cpu" else "auto")
    generation_config = getattr(lm.model, "generation_config", None)
    if generation_config is not None:  # lm-eval sets max_length; a saved max_new_tokens would win
        generation_config.max_new_tokens = None
    return lm
