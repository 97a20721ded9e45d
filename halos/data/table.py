"""The dataset table: one row per preparable dataset (`halos data prepare <name>`).

A row names its loader, its source (Hub id or local path), optionally the splits to write
(`{output: upstream}`, default: the loader's), the bad-input policy, and loader options. A YAML
file with the same mapping (`--config datasets.yaml`) can replace or extend it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

DATASETS: dict[str, dict] = {
    "synthetic": {"loader": "synthetic", "source": "synthetic"},
    "hh": {"loader": "hh", "source": "Anthropic/hh-rlhf", "on_error": "skip"},
    "hh-helpful": {"loader": "hh", "source": "Anthropic/hh-rlhf", "on_error": "skip",
                   "options": {"subsets": "helpful"}},
    "hh-harmless": {"loader": "hh", "source": "Anthropic/hh-rlhf", "on_error": "skip",
                    "options": {"subsets": "harmless"}},
    "shp": {"loader": "shp", "source": "stanfordnlp/SHP", "on_error": "skip"},
    "oasst1": {"loader": "oasst1", "source": "OpenAssistant/oasst1", "on_error": "skip"},
    "ultrafeedback": {"loader": "ultrafeedback", "source": "HuggingFaceH4/ultrafeedback_binarized",
                      "on_error": "skip"},
}
ROW_KEYS = {"loader", "source", "splits", "max_examples", "seed", "on_error", "options"}


def load_table(path: str | Path | None = None) -> dict[str, dict]:
    """The built-in table, updated with the rows of a YAML file `{name: row}` if given."""
    table = {name: dict(row) for name, row in DATASETS.items()}
    if path is not None:
        rows = yaml.safe_load(Path(path).read_text()) or {}
        rows = rows.get("datasets", rows)
        if not isinstance(rows, dict):
            raise ValueError(f"{path}: expected a mapping of dataset name -> row")
        table.update(rows)
    for name, row in table.items():
        unknown = set(row) - ROW_KEYS
        if unknown or "loader" not in row:
            raise ValueError(f"dataset {name!r}: needs 'loader'; allowed keys {sorted(ROW_KEYS)}, "
                             f"unknown {sorted(unknown)}")
    return table


def dataset_row(name: str, path: str | Path | None = None) -> dict:
    table = load_table(path)
    if name not in table:
        raise KeyError(f"unknown dataset {name!r}; choose from {sorted(table)}")
    return table[name]
