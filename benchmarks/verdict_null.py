"""Does the check's verdict tell a map from chance? How often maps of no information, and the default's own maps, get
``"ok"`` on held-out samples of the trained demo models, before (blank or inverted fails) and after the null
(:func:`~pytorch_grad_cam_vlm.metrics.null.null_maps`: a map's total must lie ``CHANCE_MARGIN`` of the
null's spreads above its mean), and how that depends on the null's size K and the threshold (issue 26, item 4).

    python benchmarks/verdict_null.py demo 40         # model, held-out samples[, seed]; writes verdict_null_demo.csv
    python benchmarks/verdict_null.py crosses 40      # then summarises every verdict_null_<model>.csv present into
                                                      # verdict_null.csv and verdict_null.md

Per sample, with the answer's logit as the target: ``explain``'s default map (staged choice, its null and its
occlusion fallback where every gradient candidate fails), ``explain(...,
method="RandomCAM")`` (its best candidate layer by the check, as ``--method RandomCAM`` gives; grad-cam's random
weights seeded per sample) and, each apart, RandomCAM's map at every candidate layer (``RandomCAM, one layer``: a random
map with no choice among layers), the default's map inverted (``1 - map``), a blank map, and the default map of an
all-black image of the same size for the answer the model predicts there. ``default, image-reliant``: the default's
maps of images whose answer depends on the image (:mod:`~pytorch_grad_cam_vlm.metrics.reliance` gives no warning); a map of
an answer that comes from the prompt is rightly not "ok". Each map's check score and total are
stored with the null's :data:`MAX_NULL` totals on its image (the first K of them are the null of size K), and with
whether it points at the evidence (its maximum on the picture within the model's pointing tolerance of an evidence
box, ``hit``) or at a distractor (``distractor``). ``RandomCAM, one layer, off the evidence`` and ``..., on the
evidence`` split RandomCAM's single-layer maps by ``hit``: a random combination of a layer's channels still follows
the objects, and one whose maximum lies on the evidence points where the model looked, which is what "ok" says.

    python benchmarks/verdict_null.py pairs 40        # also onevision, internvl: the five development models
"""
from __future__ import annotations

import csv
import glob
import os
import sys

import numpy as np
import torch

from auto_layer import geometry, held_out_cases, markdown, write_csv
from dev_models_gap import score
from pytorch_grad_cam_vlm.methods.auto import explain
from pytorch_grad_cam_vlm.metrics.deletion_check import check_maps, with_null_margins
from pytorch_grad_cam_vlm.metrics.null import CHANCE_MARGIN, NULL_MAPS, null_maps, null_margin

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_NULL = 16
KINDS = ("default", "default, image-reliant", "RandomCAM", "RandomCAM, one layer",
         "RandomCAM, one layer, off the evidence", "RandomCAM, one layer, on the evidence", "inverted", "blank",
         "black image")
SPLIT_BY_HIT = {"RandomCAM, one layer, off the evidence": 0, "RandomCAM, one layer, on the evidence": 1}
# Flagged share each kind must reach (at least) or stay under (the default's maps), issue 26's goals.
GOALS = {"default, image-reliant": ("<=", 0.05), "RandomCAM, one layer": (">=", 0.90), "inverted": (">=", 0.90),
         "blank": (">=", 1.0)}
NULL_SIZES = (4, 6, 8, 12, 16)
MARGINS = tuple(np.round(np.arange(0.0, 4.01, 0.25), 2))


def null_checks(wrapper, x, target, clean) -> list:
    """The checks of :data:`MAX_NULL` null maps of ``x`` (seed 0, as ``explain``: its null is the first
    :data:`NULL_MAPS`)."""
    return check_maps(wrapper, x, null_maps(x.shape[2:], wrapper.token_cell, MAX_NULL, 0), target, clean=clean)


def measure(name: str, n: int, seed: int) -> list:
    """One row per map of ``n`` held-out samples of model ``name`` (see the module's docstring)."""
    tolerance = geometry(name)[1]
    rows = []
    for i, sample, wrapper, x, target in held_out_cases(name, n, seed):
        frame = wrapper.image_frame(sample.image.shape[:2], tuple(x.shape[2:]))
        default = explain(wrapper, x, [target])  # its null as it runs: the occlusion fallback judged by it
        clean = default.reliance[0].clean
        np.random.seed(i)  # grad-cam's RandomCAM draws its weights from numpy's global generator
        random = explain(wrapper, x, [target], method="RandomCAM", null=0)
        good = default.model_maps[0]
        inverted, blank = check_maps(wrapper, x, np.stack([1 - good, np.full_like(good, 0.3)]), target, clean=clean)
        nulls = null_checks(wrapper, x, target, clean)
        black_x = wrapper.preprocess(np.zeros((*x.shape[2:], 3), np.uint8))
        black = explain(wrapper, black_x, None)
        black_nulls = null_checks(wrapper, black_x, black.targets[0], black.reliance[0].clean)
        one_layer = check_maps(wrapper, x, random.candidate_maps[0, 0], target, clean=clean)
        cases = [("default", default.checks[0], nulls, clean, good), ("RandomCAM", random.checks[0], nulls, clean,
                                                                      random.model_maps[0]),
                 ("inverted", inverted, nulls, clean, 1 - good), ("blank", blank, nulls, clean, None),
                 ("black image", black.checks[0], black_nulls, black.reliance[0].clean, None)]
        cases += [("RandomCAM, one layer", check, nulls, clean, cam)
                  for check, cam in zip(one_layer, random.candidate_maps[0, 0])]
        if not default.reliance[0].prompt_only:
            cases.append(("default, image-reliant", default.checks[0], nulls, clean, good))
        for kind, check, null, image_clean, cam in cases:
            if check.null_removal_drop is None:  # checked without explain's null: what its maps' removals cost
                check, = with_null_margins([check], null[:NULL_MAPS], image_clean)
            hits = score(frame.to_image(cam), sample, tolerance) if cam is not None and np.ptp(cam) > 0 else {}
            rows.append(dict(model=name, sample=i, kind=kind, score=check.score, total=check.total, clean=image_clean,
                             failed_before=int(check.blank or check.untestable or check.incomplete or check.inverted),
                             untestable=int(check.untestable), incomplete=int(check.incomplete),
                             hit=hits.get("pointing", ""), distractor=hits.get("distractor", ""),
                             null=";".join(f"{c.total:.6g}" for c in null)))
    return rows


def flagged(rows: list, k: int, threshold: float) -> float:
    """Share of ``rows`` that fail: blank, inverted, or a margin below ``threshold`` against the first ``k`` nulls."""
    return float(np.mean([r["failed_before"] or not null_margin(r["total"], r["null"][:k], r["clean"]) >= threshold
                          for r in rows])) if rows else float("nan")


def ok_on_evidence(rows: list) -> float:
    """Of ``rows``' maps that get "ok" (the defaults' null and threshold), the share that point at the evidence;
    NaN where none is "ok" or the rows carry no ``hit``."""
    hits = [float(r["hit"]) for r in rows if r.get("hit", "") != "" and not flagged([r], NULL_MAPS, CHANCE_MARGIN)]
    return float(np.mean(hits)) if hits else float("nan")


def measured_runs(prefix: str) -> list:
    """The rows of each benchmarks/``prefix``_MODEL.csv that :func:`command` wrote, one list per file, by name."""
    runs = []
    for path in sorted(glob.glob(os.path.join(HERE, f"{prefix}_*.csv"))):
        with open(path) as f:
            runs.append(list(csv.DictReader(f)))
    return runs


def summarise() -> None:
    rows = [dict(r, total=float(r["total"]), clean=float(r["clean"]), failed_before=int(r["failed_before"]),
                 null=np.array([float(v) for v in r["null"].split(";")]))
            for run in measured_runs("verdict_null") for r in run]
    models = list(dict.fromkeys(r["model"] for r in rows))
    groups = {(m, kind): [r for r in rows if r["model"] == m and r["kind"] == kind] for m in models for kind in KINDS}
    for kind, hit in SPLIT_BY_HIT.items():  # rows measured before the hit column have none: these groups stay empty
        for m in models:
            groups[(m, kind)] = [r for r in groups[(m, "RandomCAM, one layer")] if r.get("hit", "") != ""
                                 and float(r["hit"]) == hit]
    table = []  # the chosen K and threshold, before and after
    for (m, kind), group in groups.items():
        table.append(dict(model=m, maps=kind, n=len(group), flagged_before=float(np.mean([r["failed_before"]
                                                                                        for r in group])),
                          flagged_after=flagged(group, NULL_MAPS, CHANCE_MARGIN),
                          untestable=float(np.mean([int(r.get("untestable") or 0) for r in group])) if group
                          else float("nan"),
                          incomplete=float(np.mean([int(r.get("incomplete") or 0) for r in group])) if group
                          else float("nan"),
                          ok_on_evidence=ok_on_evidence(group),
                          goal=" ".join(map(str, GOALS[kind])) if kind in GOALS else ""))
    sweep = []  # every K and threshold: the worst case over the models of each goal
    for k in NULL_SIZES:
        for t in MARGINS:
            row = dict(null_maps=k, chance_margin=float(t))
            for kind, (side, goal) in GOALS.items():
                rates = [flagged(groups[(m, kind)], k, t) for m in models]
                row[kind] = max(rates) if side == "<=" else min(rates)
            off = "RandomCAM, one layer, off the evidence"  # not a goal of the issue: what "ok" should reject
            row[off] = min(flagged(groups[(m, off)], k, t) for m in models if groups[(m, off)])
            row["meets_goals"] = all(row[kind] <= goal if side == "<=" else row[kind] >= goal
                                     for kind, (side, goal) in GOALS.items())
            sweep.append(row)
    with open(os.path.join(HERE, "verdict_null.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(sweep[0]))
        writer.writeheader()
        writer.writerows(sweep)
    counts = ", ".join(f"{m} {len(groups[(m, 'default')])}" for m in models)
    text = markdown(table, f"# Does the verdict beat chance?\n\nHeld-out samples: {counts}. Flagged: the verdict is "
                           "not \"ok\". Before: blank, untestable, incomplete or inverted fails; after: also a "
                           f"total below {CHANCE_MARGIN} null spreads above the mean of {NULL_MAPS} null maps (the "
                           "defaults). ok_on_evidence: of the maps that get \"ok\", the share whose maximum lies on "
                           "the evidence. untestable: the share the check cannot test (no removal moves the target, "
                           "or any removal breaks it: MapCheck.untestable); incomplete: the share whose least "
                           "relevant 5 % breaks the target as its most relevant does while random token cells do not "
                           "(MapCheck.incomplete: its least relevant pixels hold evidence too); both counted among "
                           "the flagged. "
                           "Written by `python benchmarks/verdict_null.py MODEL N` (CPU).")
    text += "\n" + markdown([dict(r, meets_goals="yes" if r["meets_goals"] else "") for r in sweep],
                            "## Every null size and threshold\n\nWorst case over the models: the highest flagged "
                            "share of the default's maps, the lowest of the others (verdict_null.csv).")
    write_summary("verdict_null.md", text)


def write_summary(file_name: str, text: str) -> None:
    """``text`` into benchmarks/``file_name``, and printed."""
    with open(os.path.join(HERE, file_name), "w") as f:
        f.write(text)
    print(text)


def command(prefix: str, measure, summarise, third_default: int) -> None:
    """``python SCRIPT MODEL N [THIRD]``: ``measure(MODEL, N, THIRD)``'s rows into benchmarks/``prefix``_MODEL.csv
    (one torch thread), then ``summarise()``; with no arguments, ``summarise()`` alone."""
    if len(sys.argv) > 2:
        name, n = sys.argv[1], int(sys.argv[2])
        torch.set_num_threads(1)
        rows = measure(name, n, int(sys.argv[3]) if len(sys.argv) > 3 else third_default)
        write_csv(os.path.join(HERE, f"{prefix}_{name}.csv"), rows)
    summarise()


if __name__ == "__main__":
    command("verdict_null", measure, summarise, 0)
