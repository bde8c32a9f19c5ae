"""A run's metrics.jsonl, one JSON object a line, appended to as the run goes: reading and
writing it (and the run folder's other files, rewritten whole) so that a kill or a full disk never
leaves half a row or loses the rows before, and the refusal to start a second run over one
(light: the CLI checks before it imports torch)."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from fastrsb.errors import UserError


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line cut short (the run was killed, or its disk filled,
    while it was being written) is left out: it is the newest row, written after the last
    checkpoint, and a resumed run writes it again. A line that does not parse anywhere else is
    an error naming it."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number} is not a JSON line") from None
        if not isinstance(rows[-1], dict):  # valid JSON, but no row: every reader takes rows by key
            raise UserError(f"{path}:{number} is not a row (a JSON object): {line[:40]}")
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append the rows whole or not at all: a write that fails partway (a full disk) is cut back
    off, so the file never holds half a row for the next append to follow."""
    data = memoryview("".join(json.dumps(row) + "\n" for row in rows).encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def rewrite_rows(path: Path, rows: list[dict]) -> None:
    """Replace the file's rows (a resume drops those after its checkpoint), as replace_text does."""
    replace_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def replace_text(path: Path, text: str) -> None:
    """Write a run folder's file whole: beside it, then renamed over it, so that a kill in the
    middle keeps the file as it was (writing in place first empties it)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.tmp")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except BaseException:  # a full disk, an interrupt: the copy beside goes, the file stays as it was
        partial.unlink(missing_ok=True)
        raise


def scalars(row: dict) -> dict[str, float]:
    """A metrics row's figures as a dashboard's scalars (TensorBoard's, W&B's): a progress row's as
    train/KEY, an epoch's as epoch/KEY; its kind, step and epoch are where they go, not figures."""
    prefix = "train" if row["kind"] == "log" else "epoch"
    return {f"{prefix}/{key}": value for key, value in row.items()
            if key not in ("kind", "step", "epoch") and isinstance(value, (int, float))}


def check_table_path(path: Path, option: str, example: str) -> None:
    """Refuse a path a table (a command's CSV, given by OPTION) cannot be written to, before the
    minutes of work that fill it."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder: give a file name ({example})")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: its folder {path.parent} does not exist")


def write_table(path: Path, columns: tuple[str, ...], rows) -> None:
    """ROWS (dicts by COLUMNS) as a CSV with a header, written whole (replace_text)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    replace_text(path, text.getvalue())


# What a new run writes over whole, and a fastrsb run writes only after its first metrics row: in a
# folder without metrics.jsonl they are another tool's (timm's train.py writes summary.csv into its
# output folder) or somebody's. (A recipe.json alone is a run stopped at start-up: started again.)
WRITTEN_OVER = ("summary.csv", "last.pt", "best.pt")


def refuse_a_second_run(out: Path, resume: str | None) -> None:
    """A run folder that holds a run (its metrics.jsonl) is continued with --resume, never started
    over: a new run would write its rows among the old ones. Nor does a run that starts anew (new,
    or --resume auto without a last.pt) write over files of the names it writes in a folder that
    holds no fastrsb run. (A last.pt copied alone into a folder is continued by --resume auto.)"""
    if (Path(out) / "metrics.jsonl").exists():
        if resume:
            return
        raise UserError(f"{out} already holds a run (metrics.jsonl): continue it with --resume auto, "
                        "or choose another --out")
    starts_anew = not resume or (resume == "auto" and not (Path(out) / "last.pt").exists())
    if starts_anew and (found := [name for name in WRITTEN_OVER if (Path(out) / name).exists()]):
        raise UserError(f"{out} already holds {', '.join(found)} but no metrics.jsonl: not a fastrsb run's, and a "
                        "new run would write over it; choose another --out")
