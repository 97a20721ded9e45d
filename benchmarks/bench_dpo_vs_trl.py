"""DPO throughput: halos-factory vs TRL's DPOTrainer, same model, data and batch, on this machine.

What runs (one epoch, micro batch 8 pairs, max length 512, prompts left-truncated to 384, lr 5e-6,
seed 0, fp32, every configuration in its own fresh process, interleaved, repeated `--repeats`
times; the table reports medians):

- ``halos``            `halos ref-logps` (a process) then `halos align --loss dpo` (a process),
                       length-bucketed batches (the default);
- ``halos-nobucket``   the same with `--no-length-bucketing`;
- ``halos-packed``     the same as ``halos`` with `--packing` in both commands: each microbatch's
                       sequences packed into fewer rows, a pair's prompt computed once;
- ``trl-default``      TRL `DPOTrainer`, defaults: the reference model runs every step;
- ``trl-precompute``   TRL with `precompute_ref_log_probs=True` (computed inside `__init__`).

Data: seeded synthetic HH-like multi-turn conversations (prompt 30-850 tokens, responses 5-500,
log-normal lengths: prompt mean ~115 / p90 ~255, chosen mean ~40, rejected ~50), written as the
prepared-dataset JSONL halos reads. Model: Llama, hidden 256, 4 layers, 4 heads, FFN 688, vocab
8192, untied embeddings (7.4M parameters), SDPA, random init, saved with `save_pretrained`, with a
byte-level BPE tokenizer (`halos.tiny.train_tokenizer`) trained on the generated text.

TRL sees exactly the token ids halos trains on: the worker tokenizes with
`halos.data.tokenize.tokenize_paired` (same chat template and truncation) and hands TRL a dataset
of `prompt_ids` / `chosen_ids` / `rejected_ids` (TRL's own tokenized format; a subclass skips only
TRL's text tokenization, which would keep the template's trailing newline and could not express
token-level left truncation). TRL configuration per docs/reference findings: bf16 and gradient
checkpointing off, `processing_class` passed, `report_to="none"`, in-memory dataset (no
precompute cache hit), the policy loaded from the saved folder so the default reference is
reloaded from `config._name_or_path`.

Measured per configuration:

- tokens T: non-padding tokens of the chosen + rejected sequences trained on (prompt included),
  the same T for all (every pair is used once);
- training time: wall time of the training loop from its start to the end of the last optimizer
  step (halos: `time` of the last train row of metrics.jsonl, seconds since the logger started
  right before the loop; TRL: `on_train_begin` to the last `on_step_end`);
- end-to-end time: wall time of all the configuration's processes, start to exit (imports,
  loading, tokenization, the reference pass, training, saving);
- tok/s = T / time (training alone, and end to end);
- peak RSS: largest max-RSS of the configuration's processes (`getrusage`, a wrapper process per
  configuration, so nothing else is counted);
- padding fraction: 1 - real tokens / (rows x padded length), summed over the training batches
  (halos: from its own batch plan `halos.batching.plan_steps` and collate rule; TRL: measured on
  the tensors its data collator returns during training);
- MFU = model FLOPs / time / matmul peak. Matmul peak: best of several fp32 `torch.mm`
  1024x1024x1024 on this machine's threads (2 n^3 FLOPs each). Model FLOPs of the DPO work, the
  same numerator for every configuration (so MFU ratios equal speed ratios):
    * "6N": 6 N T for the policy (forward + backward) + 2 N T for the reference forward, N = the
      parameters doing matmuls (all but the input embedding); training-alone MFU counts the
      reference term only where the reference runs inside training (trl-default);
    * "LM-head-aware": the same with the LM head counted only at scored (response) positions,
      which is all DPO needs: 6 (N_body T + N_head R) [+ 2 (N_body T + N_head R)], R = response
      tokens, plus causal attention 6 L d s^2 [+ 2 L d s^2] per sequence of length s (half the
      4 L d s^2 forward FLOPs of QK^T and AV over the full square).

Run (about 25 minutes on 2 cores for 512 pairs x 3 repeats, dominated by TRL default):

    . .venv/bin/activate && pip install trl psutil
    python benchmarks/bench_dpo_vs_trl.py --pairs 512 --repeats 3 --out benchmarks/results/run.json

`--configs` picks a subset; `--work DIR` keeps the generated data, model and run folders.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("halos", "halos-nobucket", "halos-packed", "trl-default", "trl-precompute")
MICRO_BATCH, MAX_LENGTH, MAX_PROMPT, LR, SEED = 8, 512, 384, 5e-6, 0
MODEL_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, intermediate_size=688, vocab_size=8192)


# ----------------------------------------------------------------------------- data + model
_SYLLABLES = ("ka", "lo", "mi", "ra", "ten", "sul", "ver", "dan", "po", "che", "an", "is", "or",
              "el", "um", "tri", "gal", "ne", "bor", "sha", "qu", "ix", "do", "fe", "ly", "ms")
_FUNCTION = ("the", "a", "to", "of", "and", "is", "it", "you", "that", "in", "for", "do", "can",
             "what", "how", "I", "be", "not", "this", "with", "would", "are", "have", "your",
             "about", "if", "so", "just", "like", "me", "my", "there", "some", "think", "know")


def _lexicon(rng: random.Random, n: int = 6000) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


def _text(rng: random.Random, lexicon: list[str], n_words: int) -> str:
    out = []
    for i in range(max(1, n_words)):
        word = (rng.choice(_FUNCTION) if rng.random() < 0.45
                else lexicon[min(int(rng.paretovariate(0.9)) - 1, len(lexicon) - 1)
                             if rng.random() < 0.6 else rng.randrange(len(lexicon))])
        out.append(word)
        if i % rng.randint(6, 18) == 5:
            out[-1] += rng.choice((".", ",", "?", "!", "."))
    return " ".join(out)


def _lognormal(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    import math

    median = mean / math.exp(sigma * sigma / 2)
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def generate_rows(n: int, seed: int) -> list[dict]:
    """HH-like pairs: 1-4 prior exchanges, long-tailed lengths (targets in tokens, ~1.3 tok/word)."""
    rng = random.Random(seed)
    lexicon = _lexicon(rng)
    rows = []
    for i in range(n):
        prompt_tokens = _lognormal(rng, 115, 0.85, 30, 850)
        turns = 1 + 2 * min(3, int(rng.expovariate(1.0)))  # user, (assistant, user)*k
        weights = [rng.random() + 0.3 for _ in range(turns)]
        prompt = []
        for t, w in enumerate(weights):
            words = max(2, int(prompt_tokens / 1.3 * w / sum(weights)) - 4)
            prompt.append({"role": "user" if t % 2 == 0 else "assistant",
                           "content": _text(rng, lexicon, words)})
        chosen = _text(rng, lexicon, max(2, int(_lognormal(rng, 40, 0.9, 5, 500) / 1.3) - 1))
        rejected = _text(rng, lexicon, max(2, int(_lognormal(rng, 50, 0.95, 5, 500) / 1.3) - 1))
        rows.append({"id": f"synth-{i}", "source": "synthetic-hh", "prompt": prompt,
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def prepare(work: Path, pairs: int) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from halos.models.tiny import train_tokenizer

    data, model_dir = work / "data", work / "model"
    rows = generate_rows(pairs + max(8, pairs // 8), SEED)  # + a held-out test split
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:pairs]), ("test", rows[pairs:])):
        with (data / f"{name}.jsonl").open("w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in part)
    corpus = [m["content"] for r in generate_rows(4000, SEED + 1)
              for m in r["prompt"] + r["chosen"] + r["rejected"]]
    tokenizer = train_tokenizer(corpus, vocab_size=MODEL_SHAPE["vocab_size"])
    config = LlamaConfig(**MODEL_SHAPE, max_position_embeddings=1024, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return data, model_dir


def tokenized_pairs(data: Path, model_dir: Path):
    from transformers import AutoTokenizer

    from halos.data.tokenize import tokenize_paired

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (data / "train.jsonl").open()]
    pairs, _ = tokenize_paired(rows, tokenizer, max_length=MAX_LENGTH,
                               max_prompt_length=MAX_PROMPT)
    return pairs, tokenizer


# ----------------------------------------------------------------------------- workers
def _halos_worker(args, bucketing: bool, packing: bool = False) -> dict:
    """Runs the two halos commands as child processes; imports nothing heavy itself."""
    run = Path(args.run_dir)
    common = ["--model", args.model, "--data", args.data, "--micro-batch-size", str(MICRO_BATCH),
              "--deepspeed", "zero0", "--max-length", str(MAX_LENGTH), "--max-prompt-length",
              str(MAX_PROMPT), "--eval-examples", "0", "--packing" if packing else "--no-packing"]
    halos = [sys.executable, "-m", "halos"]
    ref = run / "ref.pt"
    t0 = time.perf_counter()
    # Only what DPO trains on: the train pairs (TRL's precompute scores exactly those too).
    subprocess.run([*halos, "ref-logps", *common, "--out", str(ref), "--ref-views", "paired",
                    "--ref-splits", "train"], check=True, stdout=subprocess.DEVNULL)
    t1 = time.perf_counter()
    subprocess.run([*halos, "align", "--loss", "dpo", *common, "--ref-logps", str(ref),
                    "--out", str(run / "align"), "--learning-rate", str(LR), "--epochs", "1",
                    "--no-progress", "--log-every", "1", "--seed", str(SEED),
                    "--length-bucketing" if bucketing else "--no-length-bucketing"],
                   check=True, stdout=subprocess.DEVNULL)
    t2 = time.perf_counter()
    rows = [json.loads(line) for line in (run / "align" / "metrics.jsonl").open()]
    train = [r for r in rows if r["split"] == "train"]
    return {"e2e_s": t2 - t0, "ref_s": t1 - t0, "align_s": t2 - t1, "train_s": train[-1]["time"],
            "tokens": sum(r["tokens"] for r in train), "steps": len(train),
            "mean_loss": statistics.fmean(r["loss"] for r in train),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _trl_worker(args, precompute: bool) -> dict:
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    pairs, tokenizer = tokenized_pairs(Path(args.data), Path(args.model))
    dataset = Dataset.from_dict({"prompt_ids": [p.prompt_ids for p in pairs],
                                 "chosen_ids": [p.chosen_ids for p in pairs],
                                 "rejected_ids": [p.rejected_ids for p in pairs]})

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already TRL's tokenized format, token-identical to halos

    phase = {"training": False}
    shapes: list[tuple[int, int]] = []  # (real tokens, padded positions) of training batches

    class Clock(TrainerCallback):
        begin = end = None

        def on_train_begin(self, *a, **k):
            phase["training"] = True
            Clock.begin = time.perf_counter()

        def on_step_end(self, *a, **k):
            Clock.end = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    config = DPOConfig(
        output_dir=str(Path(args.run_dir) / "trl"), per_device_train_batch_size=MICRO_BATCH,
        max_length=MAX_LENGTH, learning_rate=LR, num_train_epochs=1, bf16=False,
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=SEED, disable_tqdm=True,
        precompute_ref_log_probs=precompute)
    t_init = time.perf_counter()
    trainer = PreTokenizedDPOTrainer(model=model, args=config, train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[Clock()])
    t_ready = time.perf_counter()
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        if phase["training"]:
            mask = batch["attention_mask"]
            shapes.append((int(mask.sum()), mask.numel()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    t_end = time.perf_counter()
    real, padded = sum(s[0] for s in shapes), sum(s[1] for s in shapes)
    return {"e2e_s": t_end - t0, "init_s": t_ready - t_init, "train_s": Clock.end - Clock.begin,
            "tokens": real, "padding": 1 - real / padded, "steps": trainer.state.global_step,
            "mean_loss": statistics.fmean(losses),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(args) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    fn = {"halos": lambda: _halos_worker(args, True),
          "halos-nobucket": lambda: _halos_worker(args, False),
          "halos-packed": lambda: _halos_worker(args, True, packing=True),
          "trl-default": lambda: _trl_worker(args, False),
          "trl-precompute": lambda: _trl_worker(args, True)}[args.worker]
    result = fn()
    Path(args.result).write_text(json.dumps(result))


def run_config(name: str, data: Path, model: Path, run_dir: Path) -> dict:
    """One configuration in a fresh wrapper process; its wall clock is the end-to-end time."""
    run_dir.mkdir(parents=True)
    result = run_dir / "result.json"
    busy0, cpu0 = _machine_busy_s(), _children_cpu_s()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--worker", name, "--data", str(data), "--model",
                    str(model), "--run-dir", str(run_dir), "--result", str(result)], check=True,
                   stdout=subprocess.DEVNULL, stderr=open(run_dir / "stderr.log", "w"))  # noqa: SIM115
    out = json.loads(result.read_text())
    out["wrapper_s"] = time.perf_counter() - t0
    # CPU the rest of the machine used meanwhile (other jobs on these shared cores), as a
    # fraction of all cores: a run with a high value was slowed down by them.
    foreign = (_machine_busy_s() - busy0) - (_children_cpu_s() - cpu0)
    out["foreign_cpu_frac"] = max(0.0, foreign) / (out["wrapper_s"] * (os.cpu_count() or 1))
    return out


def _machine_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (Linux /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- analysis
def matmul_peak_gflops(n: int = 1024, tries: int = 20) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def static_stats(data: Path, model_dir: Path) -> dict:
    """Token counts, halos' padding from its own batch plan, FLOPs of the DPO work."""
    import torch
    from transformers import AutoConfig

    from halos.train.batching import example_length, make_batch, plan_steps

    pairs, _ = tokenized_pairs(data, model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    n_all = sum(t.numel() for t in weights.values())
    n_embed, n_head = vocab * d, vocab * d
    n_body = n_all - n_embed - n_head
    seqs = [(len(p.prompt_ids), len(r)) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    tokens = sum(a + b for a, b in seqs)
    resp = sum(b for _, b in seqs)
    attn = sum(layers * d * (a + b) ** 2 for a, b in seqs)  # causal forward = 2 L d s^2
    # With the prompt shared, a pair's prompt is computed (and attends) once.
    shared_attn = attn - sum(layers * d * len(p.prompt_ids) ** 2 for p in pairs)
    shared_tokens = tokens - sum(len(p.prompt_ids) for p in pairs)
    lens = [example_length(p) for p in pairs]

    def halos_padding(bucketing: bool, packing: bool = False) -> float:
        """1 - computed tokens / positions of the model's input rows over the batch plan."""
        plan = plan_steps(lens, micro_batch_size=MICRO_BATCH, grad_accum=1, world_size=1,
                          epochs=1, seed=SEED, bucketing=bucketing)
        real = positions = 0
        for step in plan:
            for micro in step:
                batch = make_batch(pairs, micro, "paired", 0, packing=packing)
                rows = batch.packed or batch
                real += batch.packed.tokens if batch.packed else batch.real_tokens
                positions += rows.input_ids.numel()
        return 1 - real / positions

    prompt_lens = sorted(len(p.prompt_ids) for p in pairs)
    del torch
    return {
        "pairs": len(pairs), "tokens": tokens, "response_tokens": resp,
        "prompt_mean": statistics.fmean(prompt_lens),
        "prompt_p90": prompt_lens[int(0.9 * len(prompt_lens))], "prompt_max": prompt_lens[-1],
        "chosen_mean": statistics.fmean(len(p.chosen_ids) for p in pairs),
        "rejected_mean": statistics.fmean(len(p.rejected_ids) for p in pairs),
        "response_max": max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs),
        "params": n_all, "params_matmul": n_all - n_embed, "params_body": n_body,
        "flops_policy_6n": 6 * (n_all - n_embed) * tokens,
        "flops_ref_2n": 2 * (n_all - n_embed) * tokens,
        "flops_policy_head_aware": 6 * (n_body * tokens + n_head * resp) + 6 * attn,
        "flops_ref_head_aware": 2 * (n_body * tokens + n_head * resp) + 2 * attn,
        "flops_policy_head_aware_shared": 6 * (n_body * shared_tokens + n_head * resp)
        + 6 * shared_attn,
        "flops_ref_head_aware_shared": 2 * (n_body * shared_tokens + n_head * resp)
        + 2 * shared_attn,
        "padding_halos": halos_padding(True), "padding_halos-nobucket": halos_padding(False),
        "padding_halos-packed": halos_padding(True, packing=True),
        # Prompt sharing computes each pair's prompt once instead of twice.
        "prompt_sharing_removes": sum(prompt_lens) / tokens,
    }


def ref_pass_stats(run_dir: Path, pairs: int) -> dict:
    import torch

    payload = torch.load(run_dir / "ref.pt", weights_only=True)
    return {"ref_sequences": len(payload["keys"]), "ref_sequences_needed": 2 * pairs}


def summarize(results: dict[str, list[dict]], stats: dict, peak: float) -> dict:
    table = {}
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("e2e_s", "train_s", "peak_rss_mb")}
        tokens = runs[0]["tokens"]
        ref_in_training = name == "trl-default"
        f_train = stats["flops_policy_6n"] + (stats["flops_ref_2n"] if ref_in_training else 0)
        f_e2e = stats["flops_policy_6n"] + stats["flops_ref_2n"]
        h_train = stats["flops_policy_head_aware"] + (
            stats["flops_ref_head_aware"] if ref_in_training else 0)
        h_e2e = stats["flops_policy_head_aware"] + stats["flops_ref_head_aware"]
        padding = runs[0].get("padding", stats.get(f"padding_{name}"))
        table[name] = {
            "tokens": tokens, "train_s": med["train_s"], "e2e_s": med["e2e_s"],
            "tok_s_train": tokens / med["train_s"], "tok_s_e2e": tokens / med["e2e_s"],
            "tok_s_train_runs": [round(tokens / r["train_s"], 1) for r in runs],
            "tok_s_e2e_runs": [round(tokens / r["e2e_s"], 1) for r in runs],
            "peak_rss_mb": med["peak_rss_mb"], "padding": padding,
            "mfu_train_6n": f_train / med["train_s"] / (peak * 1e9),
            "mfu_e2e_6n": f_e2e / med["e2e_s"] / (peak * 1e9),
            "mfu_train_head_aware": h_train / med["train_s"] / (peak * 1e9),
            "mfu_e2e_head_aware": h_e2e / med["e2e_s"] / (peak * 1e9),
            "mean_loss": statistics.median(r["mean_loss"] for r in runs),
            "foreign_cpu_frac": [round(r.get("foreign_cpu_frac", 0.0), 2) for r in runs],
            "runs": runs,
        }
        if name == "halos-packed" and "flops_policy_head_aware_shared" in stats:
            # What the hardware executed: the shared prompts once (the work is smaller).
            done_train = stats["flops_policy_head_aware_shared"]
            done_e2e = done_train + stats["flops_ref_head_aware_shared"]
            table[name]["mfu_train_executed"] = done_train / med["train_s"] / (peak * 1e9)
            table[name]["mfu_e2e_executed"] = done_e2e / med["e2e_s"] / (peak * 1e9)
    return table


def print_table(table: dict, stats: dict, peak: float) -> None:
    print(f"\n{stats['pairs']} pairs, {stats['tokens']:,} tokens (chosen+rejected, non-padding); "
          f"prompt mean {stats['prompt_mean']:.0f} / p90 {stats['prompt_p90']} / max "
          f"{stats['prompt_max']}, chosen mean {stats['chosen_mean']:.0f}, rejected mean "
          f"{stats['rejected_mean']:.0f}, response max {stats['response_max']}; "
          f"{stats['params'] / 1e6:.2f}M params; matmul peak {peak:.0f} GFLOP/s")
    head = (f"{'configuration':<16}{'tok/s train':>12}{'tok/s e2e':>11}{'train s':>9}{'e2e s':>8}"
            f"{'peak RSS':>10}{'padding':>9}{'MFU tr/e2e (6N)':>17}{'MFU tr/e2e (head)':>19}"
            f"{'mean loss':>10}")
    print(head)
    print("-" * len(head))
    for name, r in table.items():
        print(f"{name:<16}{r['tok_s_train']:>12,.0f}{r['tok_s_e2e']:>11,.0f}{r['train_s']:>9.1f}"
              f"{r['e2e_s']:>8.1f}{r['peak_rss_mb'] / 1024:>8.2f}GB{r['padding']:>9.1%}"
              f"{r['mfu_train_6n']:>9.1%}/{r['mfu_e2e_6n']:<7.1%}"
              f"{r['mfu_train_head_aware']:>11.1%}/{r['mfu_e2e_head_aware']:<7.1%}"
              f"{r['mean_loss']:>10.4f}")
    print("\nratios (medians)                train   end-to-end  peak RSS   target (e2e)")
    print(f"prompt sharing (halos-packed) removes {stats['prompt_sharing_removes']:.1%} of the "
          f"tokens; its rows' padding {stats['padding_halos-packed']:.1%}")
    packed = table.get("halos-packed", {})
    if "mfu_train_executed" in packed:
        print(f"halos-packed FLOP rate of the work it executes (head-aware, prompts once): "
              f"{packed['mfu_train_executed']:.1%} of the matmul peak in training, "
              f"{packed['mfu_e2e_executed']:.1%} end to end")
    for ours in ("halos", "halos-nobucket", "halos-packed"):
        for theirs, target in (("trl-default", 8.0), ("trl-precompute", 6.0)):
            if ours not in table or theirs not in table:
                continue
            a, b = table[ours], table[theirs]
            e2e = a["tok_s_e2e"] / b["tok_s_e2e"]
            print(f"{ours + ' / ' + theirs:<30}{a['tok_s_train'] / b['tok_s_train']:>7.2f}x"
                  f"{e2e:>10.2f}x{a['peak_rss_mb'] / b['peak_rss_mb']:>10.2f}x"
                  f"   >= {target:.0f}x {'met' if e2e >= target else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/bench_dpo_vs_trl.json")
    parser.add_argument("--work", default="", help="keep data/model/runs here (default: a temp dir)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="no runs: tabulate the runs/*/result.json already under --work")
    # internal: one configuration in its own process
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    for name in ("--data", "--model", "--run-dir", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    configs = [c for c in args.configs.split(",") if c]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    t0 = time.perf_counter()
    if args.summarize_only:
        return summarize_only(work, configs, args)
    data, model_dir = prepare(work, args.pairs)
    stats = static_stats(data, model_dir)
    peak = matmul_peak_gflops()
    print(f"prepared data/model/tokenizer in {time.perf_counter() - t0:.1f}s under {work}; "
          f"matmul peak {peak:.1f} GFLOP/s", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        for name in configs:
            run_dir = work / "runs" / f"{rep}-{name}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            r = run_config(name, data, model_dir, run_dir)
            if name.startswith("halos"):
                r.update(ref_pass_stats(run_dir, stats["pairs"]))
            results[name].append(r)
            print(f"[{rep + 1}/{args.repeats}] {name:<15} tokens {r['tokens']:,}  train "
                  f"{r['train_s']:.1f}s ({r['tokens'] / r['train_s']:,.0f} tok/s)  e2e "
                  f"{r['e2e_s']:.1f}s ({r['tokens'] / r['e2e_s']:,.0f} tok/s)  peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB  other jobs' CPU {r['foreign_cpu_frac']:.0%}  "
                  f"elapsed {time.perf_counter() - t0:.0f}s",
                  flush=True)
    peak = max(peak, matmul_peak_gflops())  # also measured after, under the same conditions
    report(results, stats, peak, args, t0)


def summarize_only(work: Path, configs: list[str], args) -> None:
    stats = static_stats(work / "data", work / "model")
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for path in sorted((work / "runs").glob("*/result.json")):
        name = path.parent.name.split("-", 1)[1]
        if name in results:
            results[name].append(json.loads(path.read_text()))
    results = {k: v for k, v in results.items() if v}
    args.repeats = min(len(v) for v in results.values())
    args.pairs = stats["pairs"]
    report(results, stats, matmul_peak_gflops(), args, time.perf_counter())


def report(results: dict[str, list[dict]], stats: dict, peak: float, args, t0: float) -> None:
    table = summarize(results, stats, peak)
    print_table(table, stats, peak)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "pairs": args.pairs,
                               "repeats": args.repeats, "matmul_peak_gflops": peak,
                               "cpu_count": os.cpu_count(), "stats": stats, "table": table},
                              indent=2))
    busy = max(max(r["foreign_cpu_frac"]) for r in table.values())
    if busy > 0.1:
        print(f"\nwarning: other jobs used up to {busy:.0%} of this machine's CPU during some "
              f"runs (per run: 'foreign_cpu_frac' in the JSON); those timings are inflated")
    print(f"\nwrote {out}; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
