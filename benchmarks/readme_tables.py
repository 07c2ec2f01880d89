"""The tables of numbers in README.md and the docs/ pages, generated from the CSV files the benchmarks wrote, so that
the documentation cannot drift from the measurements.

    python benchmarks/readme_tables.py            # rewrites the generated blocks of README.md and docs/**/*.md
    python benchmarks/readme_tables.py --check    # exit 1 if a page differs from what the CSVs give

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``; NAME is a key of
:data:`TABLES`. tests/test_docs.py checks that every page equals what this script makes of it.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import sys
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, os.pardir)


def pages() -> List[str]:
    """README.md and every page of the documentation site: the files that may hold generated blocks."""
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                recursive=True))


def read_csv(name: str) -> List[dict]:
    with open(os.path.join(HERE, name), newline="") as f:
        return list(csv.DictReader(f))


def number(text: str) -> str:
    return "–" if text in ("", None) else f"{float(text):.3f}"


def auto_layer_table() -> str:
    """Pointing / distractor / flagged of every method x layer, occlusion and the auto rows, one column group per
    model (benchmarks/auto_layer.csv)."""
    from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS

    rows = read_csv("auto_layer.csv")
    models = list(dict.fromkeys(r["model"] for r in rows))
    default = "auto: " + "+".join(sorted(AUTO_METHODS, key=lambda m: [r["method"] for r in rows].index(m)))
    checks = ("inverted default maps flagged", "blank maps flagged")
    # Every method x layer, the single-method auto rows, the default, and the default at the decoder layers alone.
    keys = list(dict.fromkeys((r["method"], r["layer"]) for r in rows if r["method"] not in checks
                              and (not r["method"].startswith("auto") or "+" not in r["method"]
                                   or r["method"].startswith(default))))
    order = list(dict.fromkeys(method for method, _ in keys))
    keys.sort(key=lambda k: (k[0].startswith("auto"), k[0] == default, order.index(k[0]),
                             -1 if k[1] in ("", "projector") else int(k[1])))
    by_key = {(r["model"], r["method"], r["layer"]): r for r in rows}
    header = "| method | layer | " + " | ".join(f"{m}: pointing | {m}: distractor | {m}: flagged" for m in models)
    lines = [header + " |", "|---|---|" + "---|---|---|" * len(models)]
    for method, layer in keys:
        cells = []
        for model in models:
            row = by_key.get((model, method, layer))
            cells += [number(row["pointing"]), number(row["distractor"]), number(row["flagged"])] if row \
                else ["–"] * 3
        name = f"**{method}** (default)" if method == default else method
        lines.append(f"| {name} | {layer or '–'} | " + " | ".join(cells) + " |")
    for check in checks:
        lines.append(f"| {check} | – | " + " | ".join(
            f"– | – | {number(by_key[(m, check, '')]['flagged'])}" for m in models) + " |")
    return "\n".join(lines)


def faithfulness_table() -> str:
    """The benchmark's own tables of README's example run (benchmarks/faithfulness_demo/summary.csv)."""
    from pytorch_grad_cam_vlm.benchmark.report import markdown_tables

    summary = []
    for row in read_csv(os.path.join("faithfulness_demo", "summary.csv")):
        parsed = {k: (None if v == "" else float(v)) for k, v in row.items() if k not in ("method", "layer", "n")}
        summary.append(dict(method=row["method"], layer=int(row["layer"]), n=int(row["n"]), **parsed))
    return markdown_tables(summary, "").strip()


def faithfulness_best_table() -> str:
    """README's short form of :func:`faithfulness_table`: the best method x layer per metric, with its reading."""
    text = faithfulness_table()
    return text[:text.index("\n\nEach method at its best layer")].strip()


def auto_cost_table() -> str:
    """What ``explain``'s default costs at 448x448 on the CPU, against one GradCAM call, one forward pass and
    occlusion, measured in the same run per model (benchmarks/bench_auto_occlusion.csv, bench_auto_3b.csv)."""
    lines = ["| model | forward images | x one GradCAM call | x one forward pass | x occlusion's time "
             "| `--fast`: x GradCAM |", "|---|---|---|---|---|---|"]
    for row in read_csv("bench_auto_occlusion.csv") + read_csv("bench_auto_3b.csv"):
        occlusion = row.get("staged_per_occlusion", "")
        occlusion = f"1/{1 / float(occlusion):.1f}" if occlusion else "–"
        name = {"3b": "Qwen2.5-VL-3B-shaped (random, bf16)"}.get(row["model"], row["model"])
        lines.append(f"| {name} | {row['staged_images']} | {float(row['staged_per_gradcam']):.1f} | "
                     f"{float(row['staged_per_forward']):.1f} | {occlusion} | {float(row['peak_per_gradcam']):.1f} |")
    return "\n".join(lines)


TABLES: Dict[str, Callable[[], str]] = {"auto_layer": auto_layer_table, "faithfulness_demo": faithfulness_table,
                                        "faithfulness_best": faithfulness_best_table, "auto_cost": auto_cost_table}


def render(text: str) -> str:
    """``text`` with every generated block replaced by what its table function gives now."""
    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise KeyError(f"A page has a generated block {name!r} that readme_tables.py does not know.")
        return f"<!-- generated: {name} -->\n{TABLES[name]()}\n<!-- end: {name} -->"
    return re.sub(r"<!-- generated: (\w+) -->\n(?:.*?\n)?<!-- end: \1 -->", fill, text, flags=re.S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a page differs")
    args = parser.parse_args()
    stale = []
    for path in pages():
        with open(path) as f:
            text = f.read()
        rendered = render(text)
        if rendered == text:
            continue
        stale.append(os.path.relpath(path, ROOT))
        if not args.check:
            with open(path, "w") as f:
                f.write(rendered)
    if args.check and stale:
        print(f"{', '.join(stale)} differ from the tables the CSVs give: run python benchmarks/readme_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
