"""Bad input in a dataset: what was wrong, where (label file, row, field, image), and what was done.

Under on_bad_input="error" the first bad row stops the load with a `BadInputError`; under "skip" the
row is left out and recorded in a `BadInputReport`, which the caller prints and logs. Problems with
the label file as a whole (missing file, missing columns) stop the load in both modes: no row of it
could be trusted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal

OnBadInput = Literal["error", "skip"]


@dataclass(frozen=True)
class BadRow:
    label_file: str
    row: int | None  # line in a text/CSV/JSONL file, row in a spreadsheet, entry (1-based) in a .mat
    kind: str  # short category for counting: "missing", "truncated", "bad MOS", "duplicate", ...
    reason: str
    image: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.label_file if self.row is None else f"{self.label_file}:{self.row}"
        what = f" [{self.field}]" if self.field else ""
        image = f" (image {self.image})" if self.image else ""
        return f"{where}{what}{image}: {self.reason}"


class BadInputError(ValueError):
    """A dataset that cannot be loaded as it is; the message names file, row and reason."""


def fail(bad: BadRow) -> BadInputError:
    return BadInputError(
        f"{bad}. data.on_bad_input=error stops at the first bad row: set data.on_bad_input=skip to leave "
        "such rows out (each one is counted in the report), or list them all with "
        "`vqr1 data check --format FORMAT PATH`."
    )


@dataclass
class BadInputReport:
    dataset: str
    rows_read: int = 0
    bad: list[BadRow] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.rows_read - len(self.bad)

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(b.kind for b in self.bad))

    def summary(self) -> str:
        if not self.bad:
            return f"{self.dataset}: {self.rows_read} rows, none bad"
        counts = ", ".join(f"{n} x {reason}" for reason, n in sorted(self.reason_counts().items()))
        return (
            f"{self.dataset}: {self.rows_read} rows, {len(self.bad)} bad rows left out "
            f"(on_bad_input=skip: {counts})"
        )

    def lines(self) -> list[str]:
        return [self.summary(), *(f"  {b}" for b in self.bad)]

    def to_json(self) -> str:
        return json.dumps(
            {
                "dataset": self.dataset,
                "rows_read": self.rows_read,
                "kept": self.kept,
                "reason_counts": self.reason_counts(),
                "bad_rows": [asdict(b) for b in self.bad],
            },
            indent=2,
        )

    def merge(self, other: BadInputReport) -> BadInputReport:
        name = self.dataset if self.dataset == other.dataset else f"{self.dataset}+{other.dataset}"
        return BadInputReport(name, self.rows_read + other.rows_read, [*self.bad, *other.bad])
