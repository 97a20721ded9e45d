"""`halos sample`: completions of held-out prompts, rendered exactly as training rendered them.

Prompts go through `halos.data.tokenize` with the run's chat template and truncation (read from
the model's halos_training.json), then get the loss's sampling suffix (CSFT's `<|good|>`).
Batches are left-padded; generation stops at EOS. Batch b runs under
`torch.manual_seed(seed * SEED_STRIDE + b)`, so a rerun with the same options writes an identical
file (temperature samples also depend on the batch size; greedy decoding does not).
"""

from __future__ import annotations

from pathlib import Path

from halos.eval import models as minfo
from halos.io import numbered_json_lines

SEED_STRIDE = 1_000_003  # batch b samples under torch.manual_seed(seed * SEED_STRIDE + b)
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


def encode_prompts(prompts: list[list[dict]], tokenizer, info: dict) -> list[list[int]]:
    """Token ids of each prompt with the generation prompt, as training tokenized it, plus the
    loss's sampling suffix."""
    from halos.data.tokenize import tokenize_unpaired

    config = info.get("config", {})
    max_length = int(config.get("max_length") or 512)
    max_prompt_length = int(config.get("max_prompt_length") or 256)
    rows = [{"id": str(i), "prompt": p, "label": "desirable",
             "completion": [{"role": "assistant", "content": "x"}]} for i, p in enumerate(prompts)]
    examples, _ = tokenize_unpaired(rows, tokenizer, max_length=max_length,
                                    max_prompt_length=max_prompt_length,
                                    chat_template=minfo.chat_template(info))
    suffix = minfo.prompt_suffix(info)
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False) if suffix else []
    return [list(e.prompt_ids) + suffix_ids for e in examples]


def load_causal_lm(model_dir: str | Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, device


def generate_ids(model, prompt_ids: list[list[int]], *, eos: int, pad: int, max_new_tokens: int,
                 temperature: float, top_p: float = 1.0, device, synced_gpus: bool = False
                 ) -> list[list[int]]:
    """One left-padded batch through `model.generate`: each completion's token ids, up to and
    including its first EOS (all of them when it has none). The caller seeds the sampling.
    `synced_gpus` keeps ZeRO-3 processes generating in step until every one has finished."""
    import torch

    width = max(map(len, prompt_ids))
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
        if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None,
                                 "top_k": None}
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids.to(device),
                                   attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, eos_token_id=eos,
                                   pad_token_id=pad, synced_gpus=synced_gpus, **options)
    out = []
    for row in generated[:, width:].tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def generate(model, tokenizer, prompt_ids: list[list[int]], *, temperature: float, top_p: float,
             max_new_tokens: int, seed: int, batch_size: int, device) -> list[str]:
    """Left-padded batched generation; returns the decoded completions (special tokens and
    surrounding whitespace removed, cut at the first EOS)."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[str] = []
    for b, start in enumerate(range(0, len(prompt_ids), batch_size)):
        torch.manual_seed(seed * SEED_STRIDE + b)
        for row in generate_ids(model, prompt_ids[start : start + batch_size], eos=eos, pad=pad,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, device=device):
            row = row[:-1] if row and row[-1] == eos else row
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def sample(model_dir: str | Path, prompts_path: str | Path, out: str | Path, *, n: int = 200,
           temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
           batch_size: int = 32) -> int:
    from halos.io import write_jsonl

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
    ids = encode_prompts([r["prompt"] for r in rows], tokenizer, info)
    completions = generate(model, tokenizer, ids, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                           device=device)
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
