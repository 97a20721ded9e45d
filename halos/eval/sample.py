"""`halos sample`: completions of held-out prompts, rendered exactly as training rendered them
(the run's truncation, chat template and sampling suffix, read from its halos_training.json).
Generation itself, seeded per batch, is halos/models/generation.py, which online PPO shares.
"""

from __future__ import annotations

from pathlib import Path

from halos.eval import models as minfo
from halos.files import numbered_json_lines
from halos.models.generation import PromptFormat, encode_prompts, generate

RESERVED = ("id", "prompt", "completion", "temperature", "top_p", "seed", "max_new_tokens",
            "model")


def read_prompt_rows(path: str | Path, n: int | None = None) -> list[dict]:
    """Rows with a `prompt` (messages or a string) and ideally an `id`; the first n of them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {str(path)!r}: no such file")
    rows = []
    for number, row in numbered_json_lines(path):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(f"{path}:{number}: needs a 'prompt' (a list of messages or a "
                             f"string)")
        rows.append({**row, "prompt": prompt, "id": str(row.get("id", f"row{number}"))})
        if n is not None and len(rows) >= n:
            break
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def prompt_format(info: dict) -> PromptFormat:
    """How the run in halos_training.json rendered its prompts ({} for a base model)."""
    config = info.get("config", {})
    return PromptFormat(max_length=int(config.get("max_length") or 512),
                        max_prompt_length=int(config.get("max_prompt_length") or 256),
                        chat_template=minfo.chat_template(info), suffix=minfo.prompt_suffix(info))


def load_causal_lm(model_dir: str | Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, device


def sample(model_dir: str | Path, prompts_path: str | Path, out: str | Path, *, n: int = 200,
           temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
           batch_size: int = 32) -> int:
    from halos.files import write_jsonl
    from halos.train.metrics import PROGRESS_EVERY_S, ProgressLines

    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    for name, value in (("--n", n), ("--max-new-tokens", max_new_tokens),
                        ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    folder = minfo.model_folder(model_dir)
    rows = read_prompt_rows(prompts_path, n)
    info = minfo.training_info(folder)
    model, tokenizer, device = load_causal_lm(folder)
    ids = encode_prompts([r["prompt"] for r in rows], tokenizer, prompt_format(info))
    lines = ProgressLines("sample", -(-len(ids) // batch_size), PROGRESS_EVERY_S)
    completions = generate(model, tokenizer, ids, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                           device=device, on_batch=lambda done, _: lines.update(done, {}))
    records = []
    for row, completion in zip(rows, completions, strict=True):
        extra = {k: v for k, v in row.items() if k not in RESERVED}
        records.append({"id": row["id"], "prompt": row["prompt"], "completion": completion,
                        "temperature": temperature, "top_p": top_p, "seed": seed,
                        "max_new_tokens": max_new_tokens, "model": str(model_dir), **extra})
    written = write_jsonl(out, records)
    print(f"[halos] sampled {written} completions (temperature {temperature}, seed {seed}) "
          f"-> {out}", flush=True)
    return written
