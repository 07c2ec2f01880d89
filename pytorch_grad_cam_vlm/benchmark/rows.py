"""The benchmark's rows on disk: ``per_sample.csv`` and each process's part file, appended row by row, merged
(each key once) when a run ends or resumes."""
from __future__ import annotations

import csv
import io
import os
from typing import Dict, List, Sequence, Tuple

from pytorch_grad_cam_vlm.benchmark.report import SCORES, curve_column, format_value

PER_SAMPLE = "per_sample.csv"
KEY = ("sample", "method", "layer")


def row_fields(percentiles: Sequence[float]) -> List[str]:
    """Columns of ``per_sample.csv``."""
    return (list(KEY) + ["target_token"] + list(SCORES) + [curve_column("morf", p) for p in percentiles]
            + [curve_column("lerf", p) for p in percentiles])


def read_rows(path: str) -> List[Dict[str, str]]:
    """The complete rows of a per-sample CSV (a last line cut off by a killed run is left out); [] if absent."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        text = f.read()
    return list(csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1])))


def part_files(out_dir: str) -> List[str]:
    return sorted(os.path.join(out_dir, name) for name in os.listdir(out_dir)
                  if name.startswith("per_sample.part") and name.endswith(".csv"))


def row_key(row: Dict[str, str]) -> Tuple[int, str, int]:
    return int(row["sample"]), row["method"], int(row["layer"])


def consolidate(out_dir: str, fields: Sequence[str]) -> List[Dict[str, str]]:
    """Merge the part files of every process into ``per_sample.csv`` (rows sorted by sample, method, layer; each
    key once), remove them, and return the rows."""
    rows: Dict[Tuple[int, str, int], Dict[str, str]] = {}
    parts = part_files(out_dir)
    for path in [os.path.join(out_dir, PER_SAMPLE)] + parts:
        for row in read_rows(path):
            rows.setdefault(row_key(row), row)
    merged = [rows[key] for key in sorted(rows)]
    staging = os.path.join(out_dir, PER_SAMPLE + ".tmp")
    with open(staging, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(merged)
    os.replace(staging, os.path.join(out_dir, PER_SAMPLE))
    for path in parts:
        os.remove(path)
    return merged


class RowWriter:
    """Appends finished rows to one process's part file, flushed row by row."""

    def __init__(self, path: str, fields: Sequence[str]) -> None:
        new = not os.path.isfile(path) or os.path.getsize(path) == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=list(fields))
        if new:
            self.writer.writeheader()

    def write(self, row: dict) -> None:
        self.writer.writerow({k: format_value(v) for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()
