"""Raw records from local files (JSON lines, JSON arrays, gzip, Parquet) or the Hugging Face Hub.

Every record carries its file and 1-based line (or row) so an error can say where it is. Local
files are read by a plain reader rather than `datasets` so malformed lines and non-UTF-8 bytes are
located exactly.
"""

from __future__ import annotations

import codecs
import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from halos.data.errors import DataError, ErrorPolicy

JSON_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Record:
    """One raw example; `line` is 1-based (the row number for Parquet and Hub data); `group` is the
    first-level folder (or Hub data_dir) it came from, e.g. an HH subset or an SHP domain."""

    file: str
    line: int
    data: dict
    group: str | None = None


def is_local(source: str | Path) -> bool:
    """A path on disk (or something that looks like one); otherwise a Hub id like 'owner/name'."""
    text = str(source)
    if Path(text).exists():
        return True
    if text.startswith(("/", ".", "~")) or text.endswith(SUFFIXES) or text.count("/") > 1:
        raise DataError(f"no such file or folder: {text}", reason="missing_file",
                        hint="check the path, or pass a Hub id like 'owner/name'")
    return False


def _stem(path: Path) -> str:
    name = path.name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def split_files(root: str | Path, split: str, subdirs: Iterable[str] | None = None) -> list[Path]:
    """Files of `split` under `root`: named `<split>.<ext>` or `<split>-<shard>.<ext>`.

    `root` may also be one file (then it is the split). `subdirs` keeps only files under those
    first-level folders (HH subsets, SHP domains).
    """
    root = Path(root)
    if root.is_file():
        return [root]
    wanted = set(subdirs) if subdirs is not None else None
    found = []
    for path in sorted(root.rglob("*")):
        stem = _stem(path)
        if not path.is_file() or not path.name.endswith(SUFFIXES):
            continue
        if stem != split and not stem.startswith(f"{split}-"):
            continue
        rel = path.relative_to(root).parts
        if wanted is not None and (len(rel) < 2 or rel[0] not in wanted):
            continue
        found.append(path)
    if not found:
        where = f" in {sorted(wanted)}" if wanted is not None else ""
        raise DataError(f"no files for split {split!r}{where} under {root}", reason="missing_file",
                        hint=f"expected files named {split}.jsonl[.gz], {split}.json or "
                             f"{split}-*.parquet")
    return found


def _open_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        yield from handle


def _first_char(path: Path) -> bytes:
    for raw in _open_lines(path):
        stripped = raw.removeprefix(codecs.BOM_UTF8).strip()
        if stripped:
            return stripped[:1]
    return b""


def _json_error(err: json.JSONDecodeError) -> str:
    """'Expecting value at column 3', also for messages that end in 'at' already."""
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


def _json_lines(path: Path, policy: ErrorPolicy) -> Iterator[Record]:
    for number, raw in enumerate(_open_lines(path), start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            policy.handle(DataError(f"bytes that are not UTF-8 at byte {err.start} of the line",
                                    reason="non_utf8", file=str(path), line=number))
            continue
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            policy.handle(DataError(f"malformed JSON line: {_json_error(err)}",
                                    reason="malformed_json", file=str(path), line=number))
            continue
        if not isinstance(data, dict):
            policy.handle(DataError(f"expected a JSON object, got {type(data).__name__}",
                                    reason="not_an_object", file=str(path), line=number))
            continue
        yield Record(str(path), number, data)


def _json_array(path: Path, policy: ErrorPolicy) -> Iterator[Record]:
    raw = b"".join(_open_lines(path))
    try:
        items = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError("bytes that are not UTF-8", reason="non_utf8", file=str(path),
                        line=line) from err
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines whose first line is an array: say it of line 1
            yield from _json_lines(path, policy)
            return
        raise DataError(f"malformed JSON: {_json_error(err)}",
                        reason="malformed_json", file=str(path), line=err.lineno) from err
    for number, data in enumerate(items, start=1):
        if not isinstance(data, dict):
            policy.handle(DataError(f"item {number} is not a JSON object", reason="not_an_object",
                                    file=str(path), line=number))
            continue
        yield Record(str(path), number, data)


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for data in batch.to_pylist():
            number += 1
            yield Record(str(path), number, data)


def file_records(path: str | Path, policy: ErrorPolicy) -> Iterator[Record]:
    """Records of one local file; JSON files may be JSON lines or one JSON array (a UTF-8
    byte-order mark is allowed)."""
    path = Path(path)
    if path.name.endswith(PARQUET_SUFFIXES):
        yield from _parquet(path)
    elif _first_char(path) == b"[":
        yield from _json_array(path, policy)
    else:
        yield from _json_lines(path, policy)


def hub_records(hub_id: str, split: str, **load_kwargs) -> Iterator[Record]:
    """Rows of a Hub dataset through `datasets.load_dataset` (honours HF_DATASETS_OFFLINE)."""
    import datasets

    dataset = datasets.load_dataset(hub_id, split=split, **load_kwargs)
    label = f"{hub_id}[{split}]" + (f"/{load_kwargs['data_dir']}" if "data_dir" in load_kwargs else "")
    for number, data in enumerate(dataset, start=1):
        yield Record(label, number, data, load_kwargs.get("data_dir"))


def records(source: str | Path, split: str, policy: ErrorPolicy,
            subdirs: Iterable[str] | None = None) -> Iterator[Record]:
    """Records of `split` from a local path (file or folder) or a Hub id (one per subdir)."""
    if is_local(source):
        root = Path(source)
        for path in split_files(root, split, subdirs):
            rel = path.relative_to(root).parts if root.is_dir() else ()
            group = rel[0] if len(rel) > 1 else None
            for record in file_records(path, policy):
                yield Record(record.file, record.line, record.data, group)
    elif subdirs is None:
        yield from hub_records(str(source), split)
    else:
        for subdir in subdirs:
            yield from hub_records(str(source), split, data_dir=subdir)
