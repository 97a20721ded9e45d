"""`halos data mix`: a dataset that is the concatenation of prepared ones (Archangel's
shp+hh+oasst1), written atomically like every other prepared dataset."""

from __future__ import annotations

from pathlib import Path

from halos.data.errors import DataError
from halos.files import atomic_dir, write_json

MIX_FILES = ("train.jsonl", "test.jsonl", "sft.jsonl", "prompts.jsonl")


def mix_datasets(parts: list[str | Path], out: str | Path) -> dict[str, int]:
    """Concatenate the normalized files of prepared datasets into `out`. A file must be in every
    part or in none (SFT data from some parts only would bias the mix)."""
    parts = [Path(p) for p in parts]
    for part in parts:
        if not part.is_dir():
            raise DataError(f"mix part {part} is not a prepared dataset folder; prepare it with "
                            f"`halos data prepare`")
    counts: dict[str, int] = {}
    with atomic_dir(out) as tmp:
        for name in MIX_FILES:
            have = [p for p in parts if (p / name).is_file()]
            if not have:
                continue
            if len(have) != len(parts):
                missing = [str(p) for p in parts if p not in have]
                raise DataError(f"mix {out}: {name} is in {[str(p) for p in have]} but not in "
                                f"{missing}")
            counts[name] = _concatenate([p / name for p in parts], tmp / name)
        write_json(tmp / "report.json", {"mix": [str(p) for p in parts], "counts": counts})
    return counts


def _concatenate(files: list[Path], out: Path) -> int:
    """Write the lines of `files` one after the other into `out`; the number of lines."""
    lines = 0
    with open(out, "w") as handle:
        for path in files:
            text = path.read_text()
            if text and not text.endswith("\n"):
                text += "\n"
            handle.write(text)
            lines += text.count("\n")
    return lines
