"""Reference log-probs: computed once per (reference model, data), read by every alignment run.

The file maps the 64-bit key of each scored sequence (its prompt and response token ids) to the
reference model's summed log-prob and token count, and records the reference checkpoint's
identity. Token-level losses (PPO) also need the per-token log-probs: they are stored as one flat
float32 array (`token_logps`, the scored tokens of each sequence in order, sequences sorted by
key) with offsets per key (`token_offsets`); files written before they existed lack both, still
serve per-sequence losses, and are refused by token-level ones. Alignment looks each sequence up by key, so any change of data, tokenizer, chat
template or truncation shows up as missing keys and is refused, as is another checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from halos.files import atomic_file

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
                         data_fingerprint: str, token_logps: torch.Tensor | None = None) -> None:
    """Write the file atomically. `token_logps` (optional) holds the per-token log-probs of every
    sequence's `tokens[i]` scored tokens, concatenated in the order of `keys`."""
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
    if token_logps is not None:
        if token_logps.numel() != int(tokens.sum()):
            raise ValueError(f"{token_logps.numel()} per-token log-probs for "
                             f"{int(tokens.sum())} scored tokens")
        starts = _offsets(tokens)[:-1]
        flat = token_logps.to(torch.float32)[_segments(starts[order], tokens[order])]
        payload["token_logps"] = flat.contiguous()
        payload["token_offsets"] = _offsets(tokens[order])
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
        self.token_logps = payload.get("token_logps")
        self.token_offsets = payload.get("token_offsets")

    def check_model(self, model: str | Path) -> None:
        identity = model_identity(model)
        if identity != self.model_identity:
            raise ReferenceMismatch(
                f"{self.path} was computed with reference model {self.model!r} "
                f"(identity {self.model_identity}), not {str(model)!r} (identity {identity}); "
                f"rerun `halos ref-logps --model {model}` or pass the matching --reference-model")

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self._positions(keys)
        return self.sums[pos], self.tokens[pos]

    def lookup_tokens(self, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The per-token log-probs (N, T-1) of the sequences `keys` on their scored-token `mask`
        (the grid of `halos.ops.token_logps_from_hidden`), 0 elsewhere; on `mask`'s device."""
        self.require_tokens()
        pos = self._positions(keys)
        counts = mask.sum(-1).cpu()
        if not torch.equal(self.tokens[pos].long(), counts.long()):
            raise ReferenceMismatch(f"{self.path}: the batch scores other tokens of its sequences "
                                    f"than the file holds; recompute it with `halos ref-logps`")
        flat = self.token_logps[_segments(self.token_offsets[pos], counts)]
        grid = torch.zeros(mask.shape, dtype=flat.dtype, device=mask.device)
        return grid.masked_scatter(mask.bool(), flat.to(mask.device))

    def require_tokens(self) -> None:
        """Fail unless the file has per-token log-probs (files of older versions do not)."""
        if self.token_logps is None or self.token_offsets is None:
            raise ReferenceMismatch(
                f"{self.path} holds per-sequence reference log-probs only; a token-level loss "
                f"(e.g. ppo) needs per-token ones: recompute it with `halos ref-logps`")

    def _positions(self, keys: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        found = self.keys[pos] == keys
        if not bool(found.all()):
            missing = int((~found).sum())
            raise ReferenceMismatch(
                f"{self.path} has no reference log-probs for {missing} of {len(keys)} sequences: "
                f"it was computed for other data, tokenizer, chat template or max length; rerun "
                f"`halos ref-logps` with the same data options as this run")
        return pos

    def check_covers(self, keys: torch.Tensor) -> None:
        """Fail before training if any sequence of the run is missing (same error as lookup)."""
        self.lookup(keys)

    def describe(self) -> str:
        return json.dumps({"model": self.model, "model_identity": self.model_identity,
                           "data_fingerprint": self.data_fingerprint, "sequences": len(self.keys),
                           "per_token": self.token_logps is not None})


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """(K+1,) int64 start of each of K consecutive segments of `lengths`, and the total."""
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).long()


def _segments(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Flat indices of the segments [starts[i], starts[i] + lengths[i]), one after the other."""
    lengths = lengths.long()
    within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(_offsets(lengths)[:-1],
                                                                      lengths)
    return torch.repeat_interleave(starts.long(), lengths) + within
