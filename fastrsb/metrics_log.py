"""Reading a run's metrics.jsonl, one JSON object a line, appended to as the run goes."""
from __future__ import annotations

import json
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
    return rows
