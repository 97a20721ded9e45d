"""Atomic file and folder writes (a crash never leaves something that looks complete), JSON
lines, and the one YAML reader of every config file (duplicate keys are errors)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (another thread may be
    creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created(path: str | Path, mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; give `path` the mode a plain open()/mkdir() would."""
    os.chmod(path, mode & ~_umask())


def _give_plain_modes(folder: Path) -> None:
    """Files some writers create private (safetensors under transformers 5 writes 0600) get the
    mode a plain open() would give, so that a group-shared results folder stays readable."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            executable = path.stat().st_mode & 0o111
            _as_if_created(path, 0o777 if executable else 0o666)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        _as_if_created(tmp, 0o777)
        yield tmp
        _give_plain_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling of `final` for writing; rename it over `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        _as_if_created(tmp, 0o666)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write `rows` as JSON lines atomically; return how many were written."""
    count = 0
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def numbered_json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed value) of each non-blank line; bad JSON names path:line."""
    with Path(path).open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err


def keep_json_lines_up_to(path: str | Path, step: int) -> None:
    """Rewrite a JSON-lines log (metrics.jsonl, samples.jsonl) atomically with only its rows
    logged at or before `step`, what a checkpoint of `step` has seen; a torn last line of a
    killed run is dropped. A missing file stays missing."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    with atomic_file(path) as handle:
        handle.writelines(kept)


def write_json(path: str | Path, obj: object) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping gives one key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter where YAML 1.1 surprises: a key given twice in one mapping
    is an error (PyYAML keeps the last), `1e-3` is a number (PyYAML wants `1.0e-3`), and only
    true/false are booleans (`no`, `on`, `yes` stay strings, as in YAML 1.2)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may be overridden: that is what they are for
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise DuplicateKeyError(None, None, f"duplicate key {key!r} (first at line "
                                            f"{first[key]})", key_node.start_mark)
                first[key] = line
            except TypeError:
                pass  # an unhashable key: the base class reports it
        return super().construct_mapping(node, deep)


UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(path: str | Path) -> Any:
    """The YAML document in `path`; any problem is a ValueError naming `path:line` and what is
    wrong, e.g. `t.yaml:4: duplicate key 'x' (first at line 3)`."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8-sig"), Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        what = "" if isinstance(err, DuplicateKeyError) else "not valid YAML: "
        raise ValueError(f"{where}: {what}{err.problem or err.context}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
