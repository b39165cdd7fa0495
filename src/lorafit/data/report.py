"""`DataReport`: what loading the data did, and the bad-record policy that fills it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..errors import DataError

# How many skip messages are kept verbatim; the rest are only counted by kind.
KEEP_REASONS = 10


class BadRecord(Exception):
    """Raised while turning one record into an example; the loader hands it to `DataReport.reject`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass
class DataReport:
    """Counts from one `load_dataset_splits` call, ready to log or save as JSON (`to_dict`)."""

    on_bad_record: Literal["error", "skip"] = "error"
    records_read: int = 0
    """Records met in the files (lines, list elements, rows), good or bad, train and eval together."""
    train_examples: int = 0
    eval_examples: int = 0
    skipped: int = 0
    skip_counts: dict[str, int] = field(default_factory=dict)
    """Skipped records per kind of fault (``"malformed JSON"``, ``"missing field"``, ...)."""
    skip_reasons: list[str] = field(default_factory=list)
    """The first `KEEP_REASONS` messages, each ``"<file>:<line>: <what is wrong>"``."""
    truncated: int = 0
    """Examples cut to ``max_length`` tokens."""
    template_fallbacks: int = 0
    """Chat examples whose loss spans came from character offsets (see `lorafit.data.chat`)."""
    packed_rows: Optional[int] = None
    """Train rows after packing (``None`` without packing)."""
    labels: Optional[list[str]] = None
    """Class names in id order (classification only); save them with the adapter."""

    def reject(self, where: str, kind: str, detail: str) -> None:
        """Apply the policy to a bad record at `where` (``file:line``): raise, or count it."""
        message = f"{where}: {detail}"
        if self.on_bad_record == "error":
            raise DataError(f"{message} (set data.on_bad_record: skip to drop such records)")
        self.skipped += 1
        self.skip_counts[kind] = self.skip_counts.get(kind, 0) + 1
        if len(self.skip_reasons) < KEEP_REASONS:
            self.skip_reasons.append(message)

    def summary(self) -> str:
        """A few human-readable lines for the training log."""
        lines = [f"data: {self.records_read} records read -> {self.train_examples} train"
                 f" / {self.eval_examples} eval examples"]
        if self.packed_rows is not None:
            lines.append(f"  packed into {self.packed_rows} train rows")
        if self.skipped:
            kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.skip_counts.items()))
            lines.append(f"  skipped {self.skipped} bad records ({kinds}); first ones:")
            lines.extend(f"    {reason}" for reason in self.skip_reasons)
        if self.truncated:
            lines.append(f"  truncated {self.truncated} examples to max_length")
        if self.template_fallbacks:
            lines.append(f"  {self.template_fallbacks} chat examples used the offset fallback for loss spans")
        if self.labels is not None:
            lines.append(f"  labels: {', '.join(self.labels)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
