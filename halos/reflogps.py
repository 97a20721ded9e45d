"""Reference log-probs: computed once per (reference model, data), read by every alignment run.

The file maps the 64-bit key of each scored sequence (its prompt and response token ids) to the
reference model's summed log-prob and token count, and records the reference checkpoint's
identity. Alignment looks each sequence up by key, so any change of data, tokenizer, chat
template or truncation shows up as missing keys and is refused, as is another checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from halos.io import atomic_file

FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SAMPLE_BLOCKS, BLOCK_BYTES = 16, 1 << 16


class ReferenceMismatch(ValueError):
    """The reference log-probs file does not belong to this model or this data."""


def model_identity(model: str | Path) -> str:
    """A fingerprint of a checkpoint folder that costs milliseconds even at 30B.

    Per weight file: its name, size and 16 evenly spaced 64 KiB blocks (the safetensors header is
    the first); plus config.json. Any retraining changes sampled bytes. A hub id resolves to its
    cached snapshot folder.
    """
    folder = _local_folder(model)
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for path in files + [folder / "config.json"]:
        if not path.exists():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            for block in range(SAMPLE_BLOCKS):
                handle.seek(size * block // SAMPLE_BLOCKS)
                digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()[:32]


def _local_folder(model: str | Path) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # a hub id: its local snapshot

    return Path(snapshot_download(str(model)))


def write_reference_file(path: str | Path, keys: torch.Tensor, sums: torch.Tensor,
                         tokens: torch.Tensor, *, model: str, identity: str,
                         data_fingerprint: str) -> None:
    order = torch.argsort(keys)
    payload = {
        "format": FORMAT_VERSION,
        "model": str(model),
        "model_identity": identity,
        "data_fingerprint": data_fingerprint,
        "keys": keys[order].contiguous(),
        "sums": sums[order].to(torch.float32).contiguous(),
        "tokens": tokens[order].to(torch.int32).contiguous(),
    }
    with atomic_file(path, "wb") as handle:
        torch.save(payload, handle)


class ReferenceLogps:
    """A loaded reference file; `lookup(keys)` returns (sums, tokens) aligned with `keys`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ReferenceMismatch(f"--ref-logps {str(self.path)!r}: no such file; compute it "
                                    f"with `halos ref-logps`")
        try:
            payload = torch.load(self.path, weights_only=True)
        except Exception as err:  # torch raises several types for a truncated/foreign file
            raise ReferenceMismatch(f"{self.path}: not a reference log-probs file ({err})") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            raise ReferenceMismatch(f"{self.path}: not a reference log-probs file of format "
                                    f"{FORMAT_VERSION}; recompute it with `halos ref-logps`")
        self.model = payload["model"]
        self.model_identity = payload["model_identity"]
        self.data_fingerprint = payload["data_fingerprint"]
        self.keys, self.sums, self.tokens = payload["keys"], payload["sums"], payload["tokens"]

    def check_model(self, model: str | Path) -> None:
        identity = model_identity(model)
        if identity != self.model_identity:
            raise ReferenceMismatch(
                f"{self.path} was computed with reference model {self.model!r} "
                f"(identity {self.model_identity}), not {str(model)!r} (identity {identity}); "
                f"rerun `halos ref-logps --model {model}` or pass the matching --reference-model")

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        found = self.keys[pos] == keys
        if not bool(found.all()):
            missing = int((~found).sum())
            raise ReferenceMismatch(
                f"{self.path} has no reference log-probs for {missing} of {len(keys)} sequences: "
                f"it was computed for other data, tokenizer, chat template or max length; rerun "
                f"`halos ref-logps` with the same data options as this run")
        return self.sums[pos], self.tokens[pos]

    def check_covers(self, keys: torch.Tensor) -> None:
        """Fail before training if any sequence of the run is missing (same error as lookup)."""
        self.lookup(keys)

    def describe(self) -> str:
        return json.dumps({"model": self.model, "model_identity": self.model_identity,
                           "data_fingerprint": self.data_fingerprint, "sequences": len(self.keys)})
