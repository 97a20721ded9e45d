"""Peak memory of one DPO loss step at large vocabularies: halos' chunked LM-head path vs the
naive full-logits path.

One step = LM head + log-softmax + DPO loss + backward to the hidden states and the head's
weight, for B pairs (N = 2B sequences) of T tokens, hidden H, fp32, given the backbone's last
hidden states (a leaf tensor: the backbone is the same for both paths and left out). Sequences
are HH-like: a prompt of `--prompt` tokens (not scored) and a response filling the rest, with
some right padding. Each configuration runs in its own fresh process: one warm-up step (so the
gradients and the libraries' workspaces exist, as in training), then the peak RSS (VmHWM, reset
through /proc/self/clear_refs) of a second step over the RSS before it.

    python benchmarks/bench_loss_memory.py [--vocabs 32000,128256] [--out results/loss_memory.json]
    python benchmarks/bench_loss_memory.py --paths naive,halos_chunked,cce   # with cut-cross-entropy

- `naive`: `logits = head(hidden)` for all N·T positions, then
  `halos.train.logps.naive_sequence_logps` (the textbook log_softmax + gather).
- `halos_chunked`: `halos.train.logps.sequence_logps_from_hidden`: the head only at scored
  positions, in checkpointed chunks of `--chunk` rows (the trainer's path).
- `cce` (only with `--paths …,cce`, needs `pip install cut-cross-entropy`): Apple's
  `linear_cross_entropy(…, reduction="none")` per scored token. Its fused kernel is Triton
  (CUDA); where Triton has no GPU it offers `impl="torch_compile"`, which this path uses on a CPU
  (the first, warm-up step compiles).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("naive", "halos_chunked", "cce")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> dict:
    """One loss step of `args.path` at `args.vocab`, measured in this process."""
    import torch
    import torch.nn.functional as F

    from halos.train.logps import naive_sequence_logps, sequence_logps_from_hidden

    torch.manual_seed(0)
    n, t = 2 * args.pairs, args.length
    hidden = torch.randn(n, t, args.hidden, requires_grad=True)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    input_ids = torch.randint(0, args.vocab, (n, t))
    loss_mask = torch.zeros(n, t, dtype=torch.bool)
    for row in range(n):  # prompt, then a response, then up to 15% padding
        loss_mask[row, args.prompt : t - (row * t * 15 // 100) // n] = True
    reference = torch.zeros(n)

    def step() -> torch.Tensor:
        if args.path == "naive":
            logps = naive_sequence_logps(head(hidden), input_ids, loss_mask).sums
        elif args.path == "cce":
            logps = _cce_sequence_logps(hidden, input_ids, loss_mask, head.weight)
        else:
            logps = sequence_logps_from_hidden(hidden, input_ids, loss_mask, head,
                                               args.chunk).sums
        ratios = (logps - reference).view(2, args.pairs)  # chosen rows, then rejected rows
        loss = -F.logsigmoid(0.1 * (ratios[0] - ratios[1])).mean()
        loss.backward()
        return loss

    step()  # warm-up: the gradients exist and the libraries' workspaces are allocated
    baseline = _rss_mb("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    started = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - started
    return {"peak_step_mb": round(_rss_mb("VmHWM:") - baseline, 1), "seconds": round(seconds, 3),
            "scored_tokens": int(loss_mask[:, 1:].sum()), "loss": float(loss)}


def _cce_sequence_logps(hidden, input_ids, loss_mask, weight):
    """Sequence sums of log p(next token) at scored positions via cut-cross-entropy."""
    import torch
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if torch.cuda.is_available() else "torch_compile"
    targets = input_ids[:, 1:].masked_fill(~loss_mask[:, 1:], -100)  # its ignore_index
    token_nll = linear_cross_entropy(hidden[:, :-1], weight, targets, impl=impl,
                                     reduction="none")  # 0 where ignored
    return -token_nll.sum(-1)


def run_config(args: argparse.Namespace, vocab: int, path: str) -> dict:
    command = [sys.executable, __file__, "--worker", path, "--vocabs", str(vocab),
               *(f"--{k}={getattr(args, k)}" for k in ("pairs", "length", "prompt", "hidden",
                                                        "chunk"))]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="32000,128256")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=130)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--paths", default="naive,halos_chunked",
                        help=f"comma-separated subset of {','.join(PATHS)} (naive is the baseline)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.path, args.vocab = args.worker, int(args.vocabs)
        print(json.dumps(worker(args)))
        return
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if "naive" not in paths or not set(paths) <= set(PATHS):
        parser.error(f"--paths {args.paths!r}: include naive, choose from {', '.join(PATHS)}")
    table = {}
    for vocab in map(int, args.vocabs.split(",")):
        rows = {path: run_config(args, vocab, path) for path in paths}
        for path, row in rows.items():
            ratio = row["peak_step_mb"] / rows["naive"]["peak_step_mb"]
            if path != "naive":
                row["ratio_vs_naive"] = round(ratio, 3)
            table[f"vocab{vocab}_{path}"] = row
            print(f"vocab {vocab:>6}  {path:<14} peak {row['peak_step_mb']:>8.1f} MB  "
                  f"{row['seconds']:>6.2f} s" + (f"  ratio {ratio:.3f}x" if path != "naive"
                                                 else ""), flush=True)
    _write(args, table)


def _write(args: argparse.Namespace, table: dict) -> None:
    if not args.out:
        return
    config = {k: getattr(args, k) for k in ("pairs", "length", "prompt", "hidden", "chunk")}
    result = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "config": config,
              "table": table}
    tmp = Path(f"{args.out}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
