"""The benchmark's report: per-method x layer means, the markdown tables, the ROAD curves and the heat table."""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from pytorch_grad_cam_vlm.benchmark.intervals import interval, sample_draws, separable
from pytorch_grad_cam_vlm.errors import InputError


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


def curve_column(curve: str, percentile: float) -> str:
    """The column of ROAD's ``curve`` (``morf``, ``lerf``) at grad-cam's ``percentile``, named by the share of pixels
    it removes: grad-cam's percentile ``p`` removes the other ``100 - p`` % (``morf_removed_90`` at p = 10)."""
    return f"{curve}_removed_{100 - percentile:g}"


def _cells(row: Dict[str, str], column: str) -> str:
    """A per-sample cell as a mean takes it: the answer change is 1 (the whole image) where it never happens."""
    return "1" if column == "answer_change" and row[column] == "" else row[column]


def summarize(rows: Sequence[Dict[str, str]], methods: Sequence[str], layers: Sequence[int],
              percentiles: Sequence[float], resamples: int = 0, seed: int = 0) -> List[dict]:
    """Mean scores per (method, layer) over the samples: ``method, layer, n``, the scores of :data:`SCORES` and the
    ROAD curves (:func:`curve_column`), each followed, with ``resamples`` > 0, by its bootstrap 95 % interval
    (``_low``, ``_high``; :mod:`~pytorch_grad_cam_vlm.benchmark.intervals`, the same draws for every row)."""
    columns = list(SCORES) + [curve_column(curve, p) for curve in ("morf", "lerf") for p in percentiles]
    samples = sorted({int(r["sample"]) for r in rows})
    draws = sample_draws(samples, resamples, seed) if resamples and samples else np.zeros((0, 0), dtype=int)
    summary = []
    for method in methods:
        for layer in layers:
            chosen = [r for r in rows if r["method"] == method and int(r["layer"]) == layer]
            row = dict(method=method, layer=layer, n=len(chosen))
            for c in columns:
                row[c] = _mean(_cells(r, c) for r in chosen)
                if resamples:
                    values = {int(r["sample"]): float(_cells(r, c)) for r in chosen if _cells(r, c) != ""}
                    row[f"{c}_low"], row[f"{c}_high"] = interval(values, samples, draws)
            summary.append(row)
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


def mean_cell(value: Optional[float], signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def with_interval(row: dict, metric: str) -> str:
    """The mean with its 95 % interval where the summary has one: ``0.705 [0.650, 0.760]``."""
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    if low is None or high is None or math.isnan(low) or _number(row, metric) is None:
        return mean_cell(row.get(metric))
    return f"{mean_cell(row[metric])} [{low:.3f}, {high:.3f}]"


def _versus(row: dict, baseline: Optional[dict], score: str) -> str:
    if baseline is None or row.get(score) is None or baseline.get(score) is None:
        return "–"
    return mean_cell(row[score] - baseline[score], signed=True)


# column -> (label, whether higher is better, unit)
METRICS: Dict[str, Tuple[str, bool, str]] = {
    "road_combined": ("ROAD combined", True, "logits"), "road_morf": ("MoRF", False, "logits"),
    "road_lerf": ("LeRF", True, "logits"), "deletion_auc": ("deletion AUC", False, "score x share"),
    "insertion_auc": ("insertion AUC", True, "score x share"),
    "deletion_auc_norm": ("deletion AUC, normalised", False, "0 canvas .. 1 clean"),
    "insertion_auc_norm": ("insertion AUC, normalised", True, "0 canvas .. 1 clean"),
    "answer_change": ("answer change", False, "share removed"),
    "top10_changed": ("answer changed at 10 %", True, "share of maps"),
    "pointing": ("pointing", True, "share of maps"),
    "distractor": ("distractor", False, "share of maps"), "energy": ("energy in box", True, "share of mass"),
    "mask_pointing": ("mask pointing", True, "share of maps"), "mask_energy": ("energy in mask", True,
                                                                            "share of mass"),
    "sanity": ("sanity", False, "Spearman rho"),
    "sanity_cascade": ("sanity, cascading", False, "Spearman rho"),
}


def _number(row: dict, metric: str) -> Optional[float]:
    value = row.get(metric)
    return None if value is None or math.isnan(value) else value


def ranked_per_metric(summary: Sequence[dict]) -> Dict[str, List[dict]]:
    """Per metric with a value, the method x layer rows (RandomCAM left out), best first (table order on ties)."""
    ranked: Dict[str, List[dict]] = {}
    for metric, (_, higher, _) in METRICS.items():
        rows = [r for r in summary if r["method"] != BASELINE and _number(r, metric) is not None]
        if rows:
            ranked[metric] = sorted(rows, key=lambda r: -_number(r, metric) if higher else _number(r, metric))
    return ranked


def best_per_metric(summary: Sequence[dict]) -> Dict[str, dict]:
    """Per metric with a value, the method x layer (RandomCAM left out) that scores best on it (the first in table
    order on ties)."""
    return {metric: rows[0] for metric, rows in ranked_per_metric(summary).items()}


def _next_best(rows: List[dict], metric: str) -> str:
    """The runner-up of a metric and whether the best is separable from it (disjoint 95 % intervals)."""
    if len(rows) < 2:
        return "–"
    runner = rows[1]
    apart = separable(rows[0], runner, metric)
    verdict = "" if apart is None else " (separable)" if apart else " (not separable)"
    return f"{runner['method']} {runner['layer']}: {mean_cell(runner[metric])}{verdict}"


def flagged_line(summary: Sequence[dict]) -> Optional[str]:
    """How many rows the saturation guard flagged (their canvas kept half the target's probability or more)."""
    rows = [r for r in summary if _number(r, "saturated") is not None]
    if not rows:
        return None
    flagged = sum(round(r["saturated"] * r["n"]) for r in rows)
    total = sum(r["n"] for r in rows)
    return (f"Saturation guard: {flagged} of {total} rows flagged (a canvas kept half the target's probability or "
            "more: the model answers the same without the image's content); the normalised AUCs leave them out.")


def reading(summary: Sequence[dict]) -> str:
    """One paragraph that reads the numbers: the most often best method x layer, how many pairs beat RandomCAM at
    their layer on ROAD and on insertion - deletion, whether ROAD and the AUCs agree, and the sanity check."""
    from scipy.stats import spearmanr

    best = best_per_metric(summary)
    if not best:
        return "No scores to read."
    by_key = {(r["method"], r["layer"]): r for r in summary}
    wins: Dict[Tuple[str, int], List[str]] = {}
    for metric, row in best.items():
        wins.setdefault((row["method"], row["layer"]), []).append(METRICS[metric][0])
    (method, layer), won = max(wins.items(), key=lambda item: len(item[1]))
    text = [f"{method} at layer {layer} is best on {len(won)} of {len(best)} metrics ({', '.join(won)})."]
    pairs = [r for r in summary if r["method"] != BASELINE]
    for metric, label in (("road_combined", "ROAD combined"), ("auc_gap", "insertion - deletion AUC")):
        beat, total = 0, 0
        for row in pairs:
            random_row = by_key.get((BASELINE, row["layer"]))
            values = [_gap(r) if metric == "auc_gap" else _number(r, metric) for r in (row, random_row or {})]
            if random_row is not None and None not in values:
                total += 1
                beat += values[0] > values[1]
        if total:
            text.append(f"{beat} of {total} method x layer pairs beat RandomCAM at their layer on {label}.")
    road = [(_number(r, "road_combined"), _gap(r)) for r in pairs]
    road = [v for v in road if None not in v]
    if len(road) >= 3:
        rho = spearmanr(*zip(*road))[0]
        verdict = "agree" if rho >= 0.5 else "partly agree" if rho > 0 else "disagree"
        text.append(f"ROAD combined and insertion - deletion AUC {verdict} on the ranking of the pairs (Spearman "
                    f"{rho:+.2f}).")
    sanity = best.get("road_combined", {}).get("sanity")
    if sanity is not None and not math.isnan(sanity):
        text.append(f"The best ROAD pair's map correlates {sanity:+.2f} with the randomized model's"
                    + (" (above 0.5: it depends little on what the model learned)." if sanity > 0.5 else "."))
    n = max(r["n"] for r in summary)
    samples = f"{n} sample" + ("s" if n != 1 else "")
    return " ".join(text) + f" Means over {samples}: differences of a few hundredths can be noise."


def _gap(row: dict) -> Optional[float]:
    insertion, deletion = _number(row, "insertion_auc"), _number(row, "deletion_auc")
    return None if insertion is None or deletion is None else insertion - deletion


def _present(summary: Sequence[dict], metrics: Sequence[str]) -> List[str]:
    """The metrics of ``metrics`` with a value in some row (mask columns only appear where samples have masks)."""
    return [m for m in metrics if any(_number(r, m) is not None for r in summary)]


def markdown_tables(summary: Sequence[dict], header: str) -> str:
    """The best method x layer per metric and a reading of the results, the best-layer table of every method
    against RandomCAM at the same layer, then the full method x layer table."""
    by_key = {(r["method"], r["layer"]): r for r in summary}
    lines = [header, "", "Best method x layer per metric (RandomCAM left out; its value at the same layer beside; "
             "[95 % bootstrap interval over samples]; the next best, and whether the intervals are disjoint):",
             "", "| metric | better | method | layer | value | RandomCAM | next best |", "|---|---|---|---|---|---|---|"]
    for metric, rows in ranked_per_metric(summary).items():
        row = rows[0]
        label, higher, unit = METRICS[metric]
        random_row = by_key.get((BASELINE, row["layer"]), {})
        lines.append(f"| {label} ({unit}) | {'higher' if higher else 'lower'} | {row['method']} | {row['layer']} | "
                     f"{with_interval(row, metric)} | {with_interval(random_row, metric)} | "
                     f"{_next_best(rows, metric)} |")
    flagged = flagged_line(summary)
    lines += ["", reading(summary)] + (["", flagged] if flagged else []) + ["",
              "Each method at its best layer (highest ROAD combined); \"vs RandomCAM\" is the difference with "
              "RandomCAM at the same layer. ROAD: change of the target logit when pixels are removed (MoRF: most "
              "relevant first, lower is better; LeRF: least relevant first, higher is better; combined = (LeRF - "
              "MoRF) / 2, higher is better). Deletion / insertion: area under the target's score as the most relevant "
              "pixels are removed (lower is better) or inserted (higher is better). Pointing / distractor: share of "
              "maps whose maximum lies in an evidence / distractor box (mask pointing: in an evidence mask). Sanity: "
              "rank correlation with the map of the randomized model (lower is better). Answer change: share of the "
              "pixels removed, in the map's order, when the model's top answer first changes (1 where it never does; "
              "lower is better); changed at 10 %: share of maps whose top 10 % removed changes it.", ""]
    masks = _present(summary, ("mask_pointing", "mask_energy"))
    columns = ["road_morf", "road_lerf", "deletion_auc", "insertion_auc"] + _present(
        summary, ("deletion_auc_norm", "insertion_auc_norm", "answer_change", "top10_changed"))
    tail = ["distractor", "energy"] + masks + _present(summary, ("sanity", "sanity_cascade"))
    lines += ["| method | layer | ROAD combined | vs RandomCAM | " + " | ".join(METRICS[c][0] for c in columns)
              + " | pointing | vs RandomCAM | " + " | ".join(METRICS[c][0] for c in tail) + " |",
              "|---|---|" + "---|" * (len(columns) + len(tail) + 4)]
    for method, row in best_layers(summary).items():
        baseline = by_key.get((BASELINE, row["layer"])) if method != BASELINE else None
        lines.append(f"| {method} | {row['layer']} | {with_interval(row, 'road_combined')} | "
                     f"{_versus(row, baseline, 'road_combined')} | "
                     + "".join(f"{with_interval(row, c)} | " for c in columns)
                     + f"{with_interval(row, 'pointing')} | {_versus(row, baseline, 'pointing')} | "
                     + " | ".join(with_interval(row, c) for c in tail) + " |")
    every = ["road_combined"] + columns + ["pointing"] + tail
    lines += ["", "Every method and layer:", "",
              "| method | layer | samples | " + " | ".join(METRICS[c][0] for c in every) + " |",
              "|---|---|---|" + "---|" * len(every)]
    for row in summary:
        lines.append(f"| {row['method']} | {row['layer']} | {row['n']} | "
                     + " | ".join(with_interval(row, c) for c in every) + " |")
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
            axes.plot(removed, [row[curve_column(curve, p)] for p in percentiles], marker="o",
                      linestyle="--" if method == BASELINE else "-", label=f"{method} (layer {row['layer']})")
        axes.set(title=title, xlabel="pixels removed and imputed (% of the image)",
                 ylabel="change of the target logit (logits)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, title="method (best layer)", title_fontsize=8)
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
            axes.text(j, i, mean_cell(values[i, j]), ha="center", va="center", color="white", fontsize=8)
    axes.set_xticks(range(len(layers)), [str(l) for l in layers])
    axes.set_yticks(range(len(methods)), list(methods))
    axes.set(xlabel="decoder layer (index)", ylabel="method", title="ROAD combined (higher is better)")
    figure.colorbar(image, ax=axes, label="ROAD combined (logits)")
    figure.savefig(path, dpi=120)


def write_outputs(out_dir: str, rows: Sequence[Dict[str, str]], methods: Sequence[str], layers: Sequence[int],
                  percentiles: Sequence[float], header: str, resamples: int = 0, seed: int = 0) -> List[str]:
    """``summary.csv``, ``benchmark.md``, ``road_curves.png`` and ``heat_table.png`` from the per-sample rows, with
    bootstrap intervals from ``resamples`` draws seeded by ``seed`` (none for 0)."""
    summary = summarize(rows, methods, layers, percentiles, resamples, seed)
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


def read_summary(run: str, columns: Sequence[str] = tuple(METRICS)
                 ) -> Dict[Tuple[str, int], Dict[str, Optional[float]]]:
    """The ``summary.csv`` of a run folder: (method, layer) -> column of ``columns`` (a metric, its ``_low`` /
    ``_high``) -> value (None where it does not apply or the run has no such column)."""
    path = os.path.join(run, "summary.csv")
    if not os.path.isfile(path):
        raise InputError(f"{run}: not a benchmark run folder (no summary.csv there).")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {(row["method"], int(row["layer"])): {m: float(row[m]) if row.get(m) not in (None, "") else None
                                                     for m in columns} for row in rows}
    except (KeyError, ValueError, TypeError) as error:
        raise InputError(f"{path}: not a benchmark summary ({type(error).__name__}: {error}).") from error


def compare_runs(run_a: str, run_b: str) -> str:
    """The difference ``B - A`` of two runs' summaries, per method x layer (those in both) and per metric (those
    with a value in both), as a markdown table, with the pairs found in one run only named below it."""
    a, b = read_summary(run_a), read_summary(run_b)
    shared = [key for key in a if key in b]
    metrics = [m for m in METRICS if any(a[k][m] is not None and b[k][m] is not None for k in shared)]
    lines = [f"B - A: B = {run_b}, A = {run_a} (higher is better for "
             + ", ".join(METRICS[m][0] for m in metrics if METRICS[m][1]) + "; lower for the others).", "",
             "| method | layer | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for method, layer in shared:
        cells = [mean_cell(b[method, layer][m] - a[method, layer][m], signed=True)
                 if a[method, layer][m] is not None and b[method, layer][m] is not None else "–" for m in metrics]
        lines.append(f"| {method} | {layer} | " + " | ".join(cells) + " |")
    alone = [f"Only in {name}: " + ", ".join(f"{m} layer {l}" for m, l in only) + "."
             for name, only in (("A", [k for k in a if k not in b]), ("B", [k for k in b if k not in a])) if only]
    return "\n".join(lines + ([""] + alone if alone else [])) + "\n"


BASELINE = "RandomCAM"


SCORES = ("road_combined", "road_morf", "road_lerf", "deletion_auc", "insertion_auc", "deletion_auc_norm",
          "insertion_auc_norm", "saturated", "answer_change", "top10_changed", "pointing", "distractor", "energy",
          "mask_pointing", "mask_energy", "sanity", "sanity_cascade", "peak_memory_gib")
