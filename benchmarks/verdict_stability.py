"""Does a second draw tell a random map from an explanation? The correlation (Pearson) of each map of a method that
draws at random with a second draw of the same method (``explain``'s ``redraw``: ``MapCheck.stability``), on the
held-out samples of ``verdict_null.py``, and how many maps each floor flags (issue 26's RandomCAM goal).

    python benchmarks/verdict_stability.py demo 200 [SMOOTH_N]  # model, samples; writes verdict_stability_demo.csv
    python benchmarks/verdict_stability.py                       # summarises every CSV into verdict_stability.md

Per sample, as ``verdict_null.py`` draws them (numpy's global generator seeded with the sample's index before
``explain(..., method="RandomCAM")``, so the first draw is the map that file checked): the stability of RandomCAM's
chosen map (``RandomCAM``) and of its map at every candidate layer (``RandomCAM, one layer``); and, on the first
``SMOOTH_N`` samples (default 40; torch's generator seeded with the index), of SmoothGradCAMPlusPlus at its default
``n_samples`` (``SmoothGradCAMPlusPlus``, ``..., one layer``): a map of a method that explains, drawn at random, that
a floor must let through. Joined with ``verdict_null_<model>.csv`` (same samples, same first draws: the chosen map's
check total is compared), ``flagged`` is the share that fails the verdict: blank, untestable, inverted, below the
null's margin (the defaults), or unstable below the floor.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import torch
from tqdm import tqdm

from auto_layer import held_out, markdown, sample_case
from verdict_null import command, measured_runs, write_summary
from verdict_null import flagged as flagged_by_margin
from pytorch_grad_cam_vlm.methods.auto import explain
from pytorch_grad_cam_vlm.metrics.map_check import STABILITY_FLOOR
from pytorch_grad_cam_vlm.metrics.null import CHANCE_MARGIN, NULL_MAPS

HERE = os.path.dirname(os.path.abspath(__file__))
FLOORS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
SMOOTH = "SmoothGradCAMPlusPlus"


def measure(name: str, n: int, smooth_n: int) -> list:
    model, processor, samples = held_out(name, n, 0)
    rows = []
    for i, sample in enumerate(tqdm(samples, desc=name, unit="sample")):
        wrapper, x, target = sample_case(model, processor, sample)
        np.random.seed(i)  # as verdict_null.py: grad-cam's RandomCAM draws from numpy's global generator
        kinds = [("RandomCAM", explain(wrapper, x, [target], method="RandomCAM", null=0))]
        if i < smooth_n:
            torch.manual_seed(i)
            kinds.append((SMOOTH, explain(wrapper, x, [target], method=SMOOTH, null=0)))
        for kind, result in kinds:
            rows.append(dict(model=name, sample=i, kind=kind, layer=str(result.layers[0]),
                             stability=result.checks[0].stability, total=result.checks[0].total))
            rows += [dict(model=name, sample=i, kind=f"{kind}, one layer", layer=str(layer),
                          stability=check.stability, total=check.total if not check.partial else "")
                     for layer, check in zip(result.candidate_layers, result.candidate_checks[0][0])]
    return rows


def null_rows(name: str) -> dict:
    """``(sample, kind) -> rows`` of ``verdict_null_<name>.csv`` (as verdict_null.py reads them)."""
    by_key = {}
    with open(os.path.join(HERE, f"verdict_null_{name}.csv")) as f:
        for r in csv.DictReader(f):
            r = dict(r, total=float(r["total"]), clean=float(r["clean"]), failed_before=int(r["failed_before"]),
                     null=np.array([float(v) for v in r["null"].split(";")]))
            by_key.setdefault((int(r["sample"]), r["kind"]), []).append(r)
    return by_key


def summarise() -> None:
    table = []
    for rows in measured_runs("verdict_stability"):
        name = rows[0]["model"]
        verdicts = null_rows(name)
        for kind in ("RandomCAM", "RandomCAM, one layer", SMOOTH, f"{SMOOTH}, one layer"):
            group = [r for r in rows if r["kind"] == kind]
            if not group:
                continue
            stability = np.array([float(r["stability"]) for r in group])
            row = dict(model=name, maps=kind, n=len(group), median_stability=float(np.nanmedian(stability)))
            by_margin = None
            if kind.startswith("RandomCAM"):  # the same first draws as verdict_null.py: join their verdicts
                by_margin, mismatched = [], 0
                for sample in sorted({int(r["sample"]) for r in group}):
                    mine = [r for r in group if int(r["sample"]) == sample]
                    theirs = verdicts[(sample, kind)]
                    assert len(mine) == len(theirs), (name, sample, kind)
                    mismatched += kind == "RandomCAM" and abs(float(mine[0]["total"]) - theirs[0]["total"]) > 1e-3
                    by_margin += [flagged_by_margin([r], NULL_MAPS, CHANCE_MARGIN) for r in theirs]
                row["margin_only"] = float(np.mean(by_margin))
                row["draws_differ"] = mismatched
            for floor in FLOORS:
                unstable = ~(stability >= floor)
                row[f"unstable<{floor:g}"] = float(np.mean(unstable))
                if by_margin is not None:
                    row[f"flagged<{floor:g}"] = float(np.mean(np.logical_or(unstable, by_margin)))
            table.append(row)
    columns = list(dict.fromkeys(k for row in table for k in row))
    table = [{c: row.get(c, "") for c in columns} for row in table]
    text = markdown(table, "# Does a second draw tell a random map from an explanation?\n\nWritten by `python "
                           "benchmarks/verdict_stability.py MODEL N` (CPU; see its docstring). `unstable<F`: the "
                           "share of maps whose correlation (Pearson) with a second draw of their method is below F "
                           "(or NaN); `margin_only`: the share verdict_null.py flags without the second draw "
                           f"(blank, untestable, inverted or below {CHANCE_MARGIN} null spreads, {NULL_MAPS} null "
                           "maps); `flagged<F`: either. `draws_differ`: samples whose chosen RandomCAM map's total "
                           "differs from verdict_null's (0: the same first draws). The floor in use: "
                           f"{STABILITY_FLOOR:g} (`STABILITY_FLOOR`).")
    write_summary("verdict_stability.md", text)


if __name__ == "__main__":
    command("verdict_stability", measure, summarise, 40)
