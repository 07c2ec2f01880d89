"""The benchmark's report: per-method x layer means, the markdown tables, the ROAD curves and the heat table."""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np


def format_value(value) -> str:
    """A CSV cell: empty for a score that does not apply, 0/1 for hits, 6 significant digits for numbers."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer, str)):
        return str(value)
    return f"{float(value):.6g}"


def _mean(values: Iterable[str]) -> Optional[float]:
    """Mean of the non-empty cells, NaN cells left out; None when no cell applies, NaN when all are NaN."""
    numbers = [float(v) for v in values if v != ""]
    if not numbers:
        return None
    finite = [v for v in numbers if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(rows: Sequence[Dict[str, str]], methods: Sequence[str], layers: Sequence[int],
              percentiles: Sequence[float]) -> List[dict]:
    """Mean scores per (method, layer) over the samples: ``method, layer, n``, the scores of :data:`SCORES` and the
    ROAD curves ``morf_P`` / ``lerf_P``."""
    columns = list(SCORES) + [f"{curve}_{p:g}" for curve in ("morf", "lerf") for p in percentiles]
    summary = []
    for method in methods:
        for layer in layers:
            chosen = [r for r in rows if r["method"] == method and int(r["layer"]) == layer]
            summary.append(dict(method=method, layer=layer, n=len(chosen),
                                **{c: _mean(r[c] for r in chosen) for c in columns}))
    return summary


def best_layers(summary: Sequence[dict]) -> Dict[str, dict]:
    """Each method's row at its best layer: the highest ROAD combined (the lower layer on ties)."""
    best: Dict[str, dict] = {}
    for row in summary:
        score = row["road_combined"]
        current = best.get(row["method"])
        if current is None or (score is not None and not math.isnan(score)
                               and (current["road_combined"] is None or math.isnan(current["road_combined"])
                                    or score > current["road_combined"])):
            best[row["method"]] = row
    return best


def _cell(value: Optional[float], signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _versus(row: dict, baseline: Optional[dict], score: str) -> str:
    if baseline is None or row[score] is None or baseline[score] is None:
        return "–"
    return _cell(row[score] - baseline[score], signed=True)


def markdown_tables(summary: Sequence[dict], header: str) -> str:
    """The best-layer table of every method against RandomCAM at the same layer, then the full method x layer
    table."""
    by_key = {(r["method"], r["layer"]): r for r in summary}
    lines = [header, "",
             "Each method at its best layer (highest ROAD combined); \"vs RandomCAM\" is the difference with RandomCAM "
             "at the same layer. ROAD: change of the target logit when pixels are removed (MoRF: most relevant "
             "first, lower is better; LeRF: least relevant first, higher is better; combined = (LeRF - MoRF) / 2, "
             "higher is better). Pointing / distractor: share of maps whose maximum lies in an evidence / "
             "distractor box. Sanity: rank correlation with the map of the randomized model (lower is better).", "",
             "| method | layer | ROAD combined | vs RandomCAM | MoRF | LeRF | pointing | vs RandomCAM | distractor "
             "| energy in box | sanity |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in best_layers(summary).items():
        baseline = by_key.get((BASELINE, row["layer"])) if method != BASELINE else None
        lines.append(f"| {method} | {row['layer']} | {_cell(row['road_combined'])} | "
                     f"{_versus(row, baseline, 'road_combined')} | {_cell(row['road_morf'])} | "
                     f"{_cell(row['road_lerf'])} | {_cell(row['pointing'])} | {_versus(row, baseline, 'pointing')} | "
                     f"{_cell(row['distractor'])} | {_cell(row['energy'])} | {_cell(row['sanity'])} |")
    lines += ["", "Every method and layer:", "",
              "| method | layer | samples | ROAD combined | MoRF | LeRF | pointing | distractor | energy in box | "
              "sanity |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        lines.append(f"| {row['method']} | {row['layer']} | {row['n']} | {_cell(row['road_combined'])} | "
                     f"{_cell(row['road_morf'])} | {_cell(row['road_lerf'])} | {_cell(row['pointing'])} | "
                     f"{_cell(row['distractor'])} | {_cell(row['energy'])} | {_cell(row['sanity'])} |")
    return "\n".join(lines) + "\n"


def plot_road_curves(summary: Sequence[dict], percentiles: Sequence[float], path: str) -> None:
    """MoRF and LeRF curves (mean change of the target logit against the share of pixels removed) of each method
    at its best layer."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    removed = [100 - p for p in percentiles]  # ROAD at percentile p removes the other 100 - p percent
    for axes, curve, title in zip(figure.subplots(1, 2), ("morf", "lerf"),
                                  ("MoRF: most relevant removed first (lower is better)",
                                   "LeRF: least relevant removed first (higher is better)")):
        for method, row in best_layers(summary).items():
            axes.plot(removed, [row[f"{curve}_{p:g}"] for p in percentiles], marker="o",
                      linestyle="--" if method == BASELINE else "-", label=f"{method} (layer {row['layer']})")
        axes.set(title=title, xlabel="pixels removed (%)", ylabel="change of the target logit")
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.savefig(path, dpi=120)


def plot_heat_table(summary: Sequence[dict], methods: Sequence[str], layers: Sequence[int], path: str) -> None:
    """ROAD combined of every method x layer as a coloured, annotated table."""
    from matplotlib.figure import Figure

    by_key = {(r["method"], r["layer"]): r["road_combined"] for r in summary}
    values = np.array([[by_key[(m, l)] if by_key[(m, l)] is not None else np.nan for l in layers] for m in methods])
    figure = Figure(figsize=(1.2 + 0.9 * len(layers), 1.0 + 0.5 * len(methods)), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    for i in range(len(methods)):
        for j in range(len(layers)):
            axes.text(j, i, _cell(values[i, j]), ha="center", va="center", color="white", fontsize=8)
    axes.set_xticks(range(len(layers)), [str(l) for l in layers])
    axes.set_yticks(range(len(methods)), list(methods))
    axes.set(xlabel="decoder layer", title="ROAD combined (higher is better)")
    figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=120)


def write_outputs(out_dir: str, rows: Sequence[Dict[str, str]], methods: Sequence[str], layers: Sequence[int],
                  percentiles: Sequence[float], header: str) -> List[str]:
    """``summary.csv``, ``benchmark.md``, ``road_curves.png`` and ``heat_table.png`` from the per-sample rows."""
    summary = summarize(rows, methods, layers, percentiles)
    paths = [os.path.join(out_dir, name) for name in ("summary.csv", "benchmark.md", "road_curves.png",
                                                      "heat_table.png")]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows({k: format_value(v) for k, v in row.items()} for row in summary)
    with open(paths[1], "w") as f:
        f.write(markdown_tables(summary, header))
    plot_road_curves(summary, percentiles, paths[2])
    plot_heat_table(summary, methods, layers, paths[3])
    return paths


BASELINE = "RandomCAM"


SCORES = ("road_combined", "road_morf", "road_lerf", "pointing", "distractor", "energy", "sanity")
