"""EAGLE's evaluation table (Chen et al., "Where MLLMs Attend and What They Rely On", CVPR 2026, Table 2): per model
and method, the insertion and deletion AUC under EAGLE's protocol (``--auc-protocol eagle``: black canvas for both
curves, 64 steps), the pointing game on the word's box and on its mask, and the peak GPU memory of a map; the
numbers its ``evals/eval_AUC_faithfulness.py`` and ``evals/eval_point_game.py`` print, one block of rows per model.

    pytorch-grad-cam-vlm benchmark --model Qwen/Qwen2.5-VL-3B-Instruct --data coco.json --auc-protocol eagle \\
        --tolerance 0 --table eagle --out runs/qwen25vl-3b          # writes runs/qwen25vl-3b/eagle_table.md
    pytorch-grad-cam-vlm benchmark --eagle-table runs/qwen25vl-3b runs/llava15-7b   # one table, several models

Each cell is the mean over the samples with its bootstrap 95 % interval (the run's ``summary.csv``); the memory is
the mean over the maps of torch's peak allocation on the GPU while the map is made (weights included), "–" on the
CPU. What differs from EAGLE's own scripts is listed in ``docs/benchmark.md``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

from pytorch_grad_cam_vlm.benchmark.report import mean_cell, read_summary, with_interval
from pytorch_grad_cam_vlm.errors import InputError

EAGLE_TABLE = "eagle_table.md"
# summary column -> EAGLE's column name (arrow: which way is better)
COLUMNS: Dict[str, str] = {"insertion_auc": "Insertion (↑)", "deletion_auc": "Deletion (↓)",
                           "pointing": "Pointing game, box (↑)", "mask_pointing": "Pointing game, mask (↑)",
                           "peak_memory_gib": "Peak GPU memory, GiB (↓)"}
# settings of a run that must be left as the eagle preset has them
AS_PUBLISHED = {"auc_protocol": "eagle", "deletion_canvas": None, "insertion_canvas": None, "auc_steps": None,
                "auc_ties": "protocol", "auc_score": "probability"}


def check_eagle_run(settings: dict, where: str) -> None:
    """Refuse the settings of a run (``settings.json``) that are not EAGLE's protocol as published, naming them."""
    changed = [f"{key} {settings.get(key)!r}" for key, value in AS_PUBLISHED.items() if settings.get(key) != value]
    if changed:
        raise InputError(f"{where}: EAGLE's table reports EAGLE's protocol; this run has {', '.join(changed)}. Run "
                         "with --auc-protocol eagle and leave --deletion-canvas, --insertion-canvas, --auc-steps, "
                         "--auc-ties and --auc-score at their defaults.")


def _run(run: str) -> Tuple[dict, Dict[Tuple[str, int], dict]]:
    """A finished run's settings and summary (every column of :data:`COLUMNS` with its interval)."""
    path = os.path.join(run, "settings.json")
    if not os.path.isfile(path):
        raise InputError(f"{run}: not a benchmark run folder (no settings.json there).")
    with open(path) as f:
        settings = json.load(f)
    check_eagle_run(settings, run)
    columns = [f"{c}{end}" for c in COLUMNS for end in ("", "_low", "_high")]
    return settings, read_summary(run, columns)


def _model_name(model: str) -> str:
    """A run's model as the table names it: an embedded model by its name, a folder by its last part."""
    from pytorch_grad_cam_vlm.demo import EMBEDDED_MODELS

    embedded = {os.path.abspath(path): name for name, path in EMBEDDED_MODELS.items()}
    return embedded.get(model, os.path.basename(model.rstrip("/")) if os.path.isabs(model) else model)


def eagle_table(runs: Sequence[str]) -> str:
    """The markdown table of finished runs (one per model; each run's every method x layer), laid out as EAGLE's
    Table 2, with a line per run saying its data and pointing tolerance."""
    lines = ["| model | method | layer | " + " | ".join(COLUMNS.values()) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    notes: List[str] = []
    for run in runs:
        settings, summary = _run(run)
        model = _model_name(settings["model"])
        tolerance = settings.get("tolerance")
        notes.append(f"- {model}: {run}, data {settings['data']}, pointing tolerance "
                     + ("half a token cell" if tolerance is None else f"{tolerance:g} px") + ".")
        for (method, layer), row in summary.items():
            cells = [with_interval(row, c) for c in COLUMNS if c != "peak_memory_gib"]
            cells.append(mean_cell(row.get("peak_memory_gib")))
            lines.append(f"| {model} | {method} | {layer} | " + " | ".join(cells) + " |")
    header = ("EAGLE's Table 2 layout: deletion / insertion under EAGLE's protocol (black canvas for both curves, 64 "
              "steps, AUC of the target's probability), pointing game on the evidence box and on the evidence mask "
              "(share of maps), peak GPU memory while a map is made (mean over maps; – on the CPU); mean "
              "[95 % bootstrap interval over samples].")
    return "\n".join([header, ""] + lines + ["", "Runs:"] + notes) + "\n"


def write_eagle_table(run: str) -> str:
    """Write :func:`eagle_table` of the finished run ``run`` to its :data:`EAGLE_TABLE`; returns the path."""
    path = os.path.join(run, EAGLE_TABLE)
    text = eagle_table([run])
    staging = path + ".tmp"
    with open(staging, "w") as f:
        f.write(text)
    os.replace(staging, path)
    return path
