"""Readers: a file or data set becomes `Record`s that remember where they came from.

Supported: JSON Lines (``.jsonl``, ``.ndjson``), JSON (``.json``: a list of objects, or JSON Lines
when the file does not start with ``[``), CSV (``.csv``) and TSV (``.tsv``, ``.tab``). Any other
string that is not an existing file is loaded with Hugging Face ``datasets``: a directory written
by ``save_to_disk`` through ``load_from_disk``, anything else (a hub name, a folder of data files)
through ``load_dataset``. Readers are generators, so a `max_records` cap stops reading early.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from ..errors import DataError
from .config import DataConfig
from .report import DataReport

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
DELIMITED_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
FILE_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + tuple(DELIMITED_SUFFIXES)


@dataclass(frozen=True)
class Record:
    """One raw record. `line` is 1-based: the line where it starts, or the row of a data set."""

    source: str
    line: int
    fields: Mapping[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def is_local_file(name: str) -> bool:
    """Whether `name` is read by lorafit's own readers rather than by ``datasets``."""
    path = Path(name)
    return path.is_file() or path.suffix.lower() in FILE_SUFFIXES


def read_records(name: str, cfg: DataConfig, split: str, report: DataReport) -> Iterator[Record]:
    """Yield the records of file or data set `name`; malformed ones go to `report.reject`.

    `split` only matters for Hugging Face data sets.
    """
    path = Path(name)
    if not is_local_file(name):
        yield from _read_hf(name, split, cfg.dataset_config, report)
        return
    if not path.is_file():
        raise DataError(f"{name}: no such file")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path, report)
    elif suffix in JSON_SUFFIXES:
        yield from _read_json(path, report)
    elif suffix in DELIMITED_SUFFIXES:
        yield from _read_delimited(path, cfg.delimiter or DELIMITED_SUFFIXES[suffix], cfg.columns, report)
    else:
        raise DataError(f"{name}: unsupported file type {suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}")


def _object_record(path: Path, line: int, value: Any, report: DataReport) -> Optional[Record]:
    if isinstance(value, dict):
        return Record(str(path), line, value)
    report.reject(f"{path}:{line}", "not an object", f"expected a JSON object, got {type(value).__name__}")
    return None


def _read_jsonl(path: Path, report: DataReport) -> Iterator[Record]:
    # Binary lines, decoded one by one, so that a bad byte is reported with its line number.
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, 1):
            if not raw.strip():
                continue
            report.records_read += 1
            where = f"{path}:{number}"
            try:
                value = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError as exc:
                report.reject(where, "not UTF-8", f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            except json.JSONDecodeError as exc:
                report.reject(where, "malformed JSON", f"malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            record = _object_record(path, number, value, report)
            if record is not None:
                yield record


def _read_json(path: Path, report: DataReport) -> Iterator[Record]:
    """Elements of a top-level JSON list, each with the line where it starts.

    A syntax error inside the list cannot be skipped (where the next element starts is unknown),
    so it raises `DataError` under either policy.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        yield from _read_jsonl(path, report)
        return
    line, counted = 1, 0

    def line_at(offset: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    pos = _skip_space(text, pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                            "a broken JSON list cannot be skipped past") from None
        report.records_read += 1
        record = _object_record(path, line_at(pos), value, report)
        if record is not None:
            yield record
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos):
            return
        else:
            raise DataError(f"{path}:{line_at(pos)}: malformed JSON (expected ',' or ']' after a list element)")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_delimited(path: Path, delimiter: str, columns: Optional[list[str]],
                    report: DataReport) -> Iterator[Record]:
    """Rows of a CSV/TSV file as records keyed by column name; every cell is stripped.

    TSV is read without quote handling (a tab-separated cell cannot contain a tab, and quotes in
    text are literal); CSV follows the usual double-quote rules.
    """
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream, delimiter=delimiter, quoting=quoting)
        rows = _numbered_rows(reader, path)
        if columns is None:
            _, header = next(rows, (1, None))
            if header is None:
                raise DataError(f"{path}:1: empty file; expected a header row naming the columns")
            columns = [cell.strip() for cell in header]
        for number, row in rows:
            if not any(cell.strip() for cell in row):
                continue
            report.records_read += 1
            if len(row) != len(columns):
                report.reject(f"{path}:{number}", "wrong column count",
                              f"expected {len(columns)} columns ({', '.join(columns)}), found {len(row)}")
                continue
            yield Record(str(path), number, {name: cell.strip() for name, cell in zip(columns, row)})


def _numbered_rows(reader: Any, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) for each row; a quoted cell may span lines, so the start is kept."""
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{start}: not valid UTF-8 ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{start}: malformed row ({exc})") from None
        yield start, row


def _read_hf(name: str, split: str, config_name: Optional[str], report: DataReport) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: no such file (install `datasets` to load it as a Hugging Face data set)") from None
    path = Path(name)
    saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    try:
        if saved:
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DataError(f"{name}: no split {split!r}; available: {', '.join(data)}")
                data = data[split]
        else:
            data = datasets.load_dataset(name, config_name, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types for "cannot load this"
        raise DataError(f"{name}: neither a local file nor a loadable data set "
                        f"({type(exc).__name__}: {exc})") from None
    source = f"{name}[{split}]"
    for number, row in enumerate(data, 1):
        report.records_read += 1
        yield Record(source, number, row)
