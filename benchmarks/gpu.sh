#!/usr/bin/env bash
# The DPO benchmark on GPUs: a randomly initialised 1B-class Llama (hidden 2048, 16 layers, FFN
# 5632, vocab 32000), bf16, SDPA attention (flash_attention_2 where flash_attn imports), ZeRO-3
# across every visible GPU, the HH-like data of bench_dpo_vs_trl.py. Prints tokens/s/GPU and
# MFU = 6·N·(tokens/s/GPU) / peak. No downloads.
#
#   bash benchmarks/gpu.sh                 # PAIRS=2048 STEPS=40 PEAK_TFLOPS=989 WORK=/tmp/halos-gpu
#
# PEAK_TFLOPS is one GPU's dense bf16 peak: 989 for H100/H200 SXM, 312 for A100.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${PAIRS:-2048} STEPS=${STEPS:-40} PEAK_TFLOPS=${PEAK_TFLOPS:-989}
WORK=${WORK:-/tmp/halos-gpu} MICRO=${MICRO:-8} PY=${PYTHON:-python}

if ! command -v nvidia-smi >/dev/null || ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu.sh: no CUDA GPU visible (nvidia-smi / torch.cuda.is_available()); run it on a GPU node" >&2
    exit 2
fi
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
ATTN=sdpa
"$PY" -c 'import flash_attn' 2>/dev/null && ATTN=flash_attention_2
mkdir -p "$WORK"

"$PY" - "$WORK" "$PAIRS" <<'EOF'
import json, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, "benchmarks")
from bench_dpo_vs_trl import SEED, generate_rows
from halos.models.tiny import train_tokenizer

work, pairs = Path(sys.argv[1]), int(sys.argv[2])
rows = generate_rows(pairs + 64, SEED)
(work / "data").mkdir(exist_ok=True)
for name, part in (("train", rows[:pairs]), ("test", rows[pairs:])):
    (work / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
corpus = [m["content"] for r in rows[:4000] for m in r["prompt"] + r["chosen"] + r["rejected"]]
tokenizer = train_tokenizer(corpus, vocab_size=32000)
config = LlamaConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16, intermediate_size=5632,
                     max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
torch.manual_seed(SEED)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(work / "model")
tokenizer.save_pretrained(work / "model")
EOF

COMMON=(--model "$WORK/model" --data "$WORK/data" --deepspeed zero3 --precision bf16
        --attn-implementation "$ATTN" --micro-batch-size "$MICRO" --max-length 512
        --max-prompt-length 384 --eval-examples 0 --no-progress)
RUN="$PY -m torch.distributed.run --nproc-per-node $GPUS -m halos"
rm -rf "$WORK/ref.pt" "$WORK/align"
start=$(date +%s)
$RUN ref-logps "${COMMON[@]}" --ref-views paired --ref-splits train --out "$WORK/ref.pt"
$RUN align --loss dpo "${COMMON[@]}" --ref-logps "$WORK/ref.pt" --max-steps "$STEPS" \
    --log-every 1 --out "$WORK/align"
echo "wall time (reference pass + alignment, $GPUS GPUs, attention $ATTN): $(( $(date +%s) - start )) s"

"$PY" - "$WORK" "$GPUS" "$PEAK_TFLOPS" <<'EOF'
import json, math, sys
from pathlib import Path
from safetensors import safe_open
work, gpus, peak = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) * 1e12
params = 0
for shard in (work / "align" / "model").glob("*.safetensors"):
    with safe_open(str(shard), "pt") as f:
        params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
rows = [json.loads(l) for l in (work / "align" / "metrics.jsonl").open()]
train = [r for r in rows if r.get("split") == "train"][3:]  # skip warm-up steps
tokens, seconds = sum(r["tokens"] for r in train), sum(r["tokens"] / r["tokens_per_s"] for r in train)
per_gpu = tokens / seconds / gpus
print(f"params {params / 1e6:,.0f}M  tokens/s/GPU {per_gpu:,.0f}  "
      f"MFU (6N, policy training only) {6 * params * per_gpu / peak:.1%}")
EOF
