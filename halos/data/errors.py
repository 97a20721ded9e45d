"""Bad input: one error type that names where the problem is, and a policy to raise or count it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """A problem with one input example, located by file and 1-based line (or row)."""

    def __init__(self, message: str, *, reason: str = "invalid", file: str | None = None,
                 line: int | None = None, hint: str | None = None):
        self.message, self.reason, self.file, self.line, self.hint = message, reason, file, line, hint
        super().__init__(self._text())

    def _text(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{self.message}{hint}"

    def at(self, file: str | None, line: int | None) -> DataError:
        """The same error, located (keeps a location that is already set)."""
        if self.file is None:
            self.file, self.line = file, line
            self.args = (self._text(),)
        return self


SKIP_HINT = "fix the input, or pass on_error='skip' (--on-error skip) to count and skip such examples"


@dataclass
class ErrorPolicy:
    """`raise`: the first bad example stops everything. `skip`: bad examples are counted by reason."""

    on_error: OnError = "raise"
    skipped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)  # dropped by a dataset's own rules, not errors
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    @classmethod
    def of(cls, on_error: OnError | ErrorPolicy) -> ErrorPolicy:
        return on_error if isinstance(on_error, ErrorPolicy) else cls(on_error)

    def handle(self, error: DataError) -> None:
        """Raise `error`, or record it as one skipped example."""
        if self.on_error == "raise":
            if error.hint is None:
                error.hint = SKIP_HINT
                error.args = (error._text(),)
            raise error
        self.skipped[error.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    def note(self, reason: str, n: int = 1) -> None:
        """Count examples a loader's rules leave out on purpose (e.g. SHP score ratio < 2)."""
        self.filtered[reason] += n

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = f"skipped {self.n_skipped}{_reasons(self.skipped)}"
        if self.filtered:
            text += f"; filtered by dataset rules {sum(self.filtered.values())}{_reasons(self.filtered)}"
        return text


def _reasons(counts: Counter) -> str:
    return " (" + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) + ")" if counts else ""
