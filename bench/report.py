"""Plain-text tables and JSON output for benchmark results."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Cell = str | int | float | None


def format_cell(value: Cell, digits: int = 1) -> str:
    """A table cell: floats with `digits` decimals, NaN and None as `n/a`."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], digits: int = 1) -> str:
    """A fixed-width table: the first column left-aligned, the others right-aligned."""
    cells = [list(headers)] + [[format_cell(value, digits) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def format_ratio(value: float) -> str:
    """A ratio such as `12.3x`, or `n/a` when it could not be computed."""
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def _json_safe(value: Any) -> Any:
    # JSON has no NaN; null says "not measured" to any reader.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write results as indented UTF-8 JSON (NaN as null), creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(payload), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_note() -> str:
    """The machine's 1-minute load average against its CPU count, with a warning when other work
    shares the cores (then only figures of one run compare, and CPU-time figures are the steadier)."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    note = f"load average {load:.1f} on {cpus} CPUs"
    if load > 0.5 * cpus:
        note += ": other work shares these cores, so absolute figures are low and noisy"
    return note
