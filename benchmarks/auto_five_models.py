"""Which rule ``explain``'s default (auto) should use, measured on all five development models (issue 26,
deliverable 3): today's staged check against the full check and the directions the onevision misses point to,
each scored on the user's picture against occlusion (the same held-out samples and scoring as
``benchmarks/dev_models_gap.py``).

    python benchmarks/auto_five_models.py collect --models demo,crosses,pairs,onevision,internvl --n 200 --seed 0
    python benchmarks/auto_five_models.py table        # writes auto_five_models.csv and .md from the collected rows

``collect`` appends one row per (model, seed, sample, rule) to ``auto_five_models_samples.csv.gz`` (rows of the same
model and seed are replaced). Per sample, ``explain(..., choice="peak", null=0)`` gives every default candidate's
map (AUTO_METHODS at the projector and every candidate decoder layer); each rule chooses among the same maps through
:func:`~pytorch_grad_cam_vlm.methods.choice.choose_map` (today's staged choice, the full check). The rules:

- ``staged (today)``: the default; ``full check``: every map checked at every fraction, the highest total kept;
- ``staged, mean of the 2 checked``: the mean of the two maps the staged choice checks in full (same images);
- ``staged, peak window one token cell`` / ``two token cells``: the staged choice with the window removed around
  each map's peak (``PEAK_WINDOW``, 28 px: one token cell of the Qwen models) one or two of the model's token cells
  wide (8 / 16 px on the tiled models, 28 / 56 px on the Qwen ones; a window equal to 28 px is today's call);
- ``staged, fractions 0.05,0.1,0.2``: the staged choice with the check's fractions of round 1;
- ``staged, best 3 checked`` (and ``, their mean``): the staged choice checking 3 maps in full, not 2;
- ``full, mean of the best 2`` / ``best 3``: the mean of the 2 / 3 maps of the highest full totals;
- ``staged, no tile-edge peak``: the staged choice over the maps whose peak is not on the first or last token row
  of a tile (the whole input for the Qwen models; all maps when every one peaks there): the staged choice run on
  those maps alone;
- ``staged, no peak next to the letterbox``: the same over the maps whose peak is not on a token row (or column) of
  the picture that borders the input's padding (onevision's letterbox; no map is left out where the picture fills
  the input);
- ``any candidate`` (the ceiling of any choice among these maps: one of them points at the evidence) and
  ``occlusion`` (the reference; read from ``dev_models_gap_samples.csv`` for seed 0 where it has the sample).

``images``: forward images per sample of the choice (after the sweep passes; counted by a hook on the wrapper).
The ``diagnosis`` rows of the sample file hold other numbers in the same columns: ``pointing`` 1 where the staged
choice's map peaks on a tile-edge token row, ``distractor`` the share of all candidates that do, ``energy`` 1 where
it peaks next to the letterbox (NaN in rows collected before that flag).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import time
from typing import Dict, List

import numpy as np
import torch
from tqdm import tqdm

from auto_layer import geometry, held_out, markdown, sample_case, write_csv
from dev_models_gap import score
from pytorch_grad_cam_vlm import explain, occlusion_map
from pytorch_grad_cam_vlm.methods import choice
from pytorch_grad_cam_vlm.methods.choice import choose_map, ranked
from pytorch_grad_cam_vlm.metrics.deletion_check import PEAK_WINDOW

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, "auto_five_models_samples.csv.gz")
MODELS = ("demo", "crosses", "pairs", "onevision", "internvl")


def edge_peak(wrapper, cam: np.ndarray) -> bool:
    """Whether ``cam`` (on the model's input) peaks on the first or last token row of a tile (tiled families) or of
    the whole input (the Qwen models)."""
    if not np.isfinite(cam).any() or np.nanmax(cam) <= np.nanmin(cam):
        return False
    row = int(np.unravel_index(np.nanargmax(cam), cam.shape)[0])
    cell = int(wrapper.token_cell)
    tile = int(getattr(wrapper, "tile_size", cam.shape[0]))
    within = row % tile
    return within < cell or within >= tile - cell


def padding_peak(wrapper, frame, cam: np.ndarray) -> bool:
    """Whether ``cam`` (on the model's input) peaks on a token row or column of the picture that borders the
    input's padding (a letterbox: onevision's first and last rows of picture tokens); never on an input the picture
    fills."""
    if not np.isfinite(cam).any() or np.nanmax(cam) <= np.nanmin(cam):
        return False
    row, col = np.unravel_index(np.nanargmax(cam), cam.shape)
    cell, (height, width) = int(wrapper.token_cell), cam.shape
    for piece in frame.pieces:
        y, x, h, w = piece.input_box
        if not (y <= row < y + h and x <= col < x + w):
            continue
        if (y > 0 and row < y + cell) or (y + h < height and row >= y + h - cell) or \
                (x > 0 and col < x + cell) or (x + w < width and col >= x + w - cell):
            return True
    return False


def staged_kept(kept: int, run):
    """``run()`` with the staged choice checking ``kept`` maps in full."""
    default = choice.STAGED_KEPT
    choice.STAGED_KEPT = kept
    try:
        return run()
    finally:
        choice.STAGED_KEPT = default


def mean_map(maps: List[np.ndarray]) -> np.ndarray:
    """The mean of maps on the picture, each rescaled to [0, 1] (NaN where unseen kept)."""
    scaled = []
    for m in maps:
        lo, hi = np.nanmin(m), np.nanmax(m)
        scaled.append((m - lo) / (hi - lo) if hi > lo else np.zeros_like(m))
    return np.mean(scaled, axis=0)


def reference_rows(name: str, seed: int, reuse: bool) -> Dict[int, dict]:
    """dev_models_gap's per-sample rows of ``name`` (seed 0 only; ``reuse``: only when asked, since they must come
    from the same shipped model)."""
    path = os.path.join(HERE, "dev_models_gap_samples.csv")
    if not reuse or seed != 0 or not os.path.exists(path):
        return {}
    return {int(r["sample"]): r for r in csv.DictReader(open(path)) if r["model"] == name}


def collect(name: str, n: int, seed: int, reuse: bool = False) -> List[dict]:
    model, processor, samples = held_out(name, n, seed)
    window, tolerance = geometry(name)
    known = reference_rows(name, seed, reuse)
    rows = []
    for i, sample in enumerate(tqdm(samples, desc=f"{name} seed {seed}", unit="sample")):
        wrapper, x, target = sample_case(model, processor, sample)
        size = sample.image.shape[:2]
        frame = wrapper.image_frame(size, tuple(x.shape[2:]))
        base = dict(model=name, seed=seed, sample=i)

        def add(rule, cam, images, chosen=""):
            row = dict(base, rule=rule, chosen=chosen, images=images)
            row.update(score(cam, sample, tolerance))
            rows.append(row)

        if i in known:
            r = known[i]
            rows.append(dict(base, rule="occlusion", chosen="", images="", pointing=float(r["occlusion_pointing"]),
                             distractor=float(r["occlusion_distractor"]), energy=float(r["occlusion_energy"])))
        else:
            add("occlusion", frame.to_image(occlusion_map(wrapper, x, target.category, window=window)), "")
        made = explain(wrapper, x, [target], image_size=size, choice="peak", null=0)  # the candidates' maps
        maps = made.candidate_maps[0].reshape(-1, *made.candidate_maps.shape[3:])
        names = [f"{m}@{l}" for m in made.candidate_methods for l in made.candidate_layers]
        edges = [edge_peak(wrapper, m) for m in maps]
        allowed = [k for k in range(len(maps)) if not edges[k]] or list(range(len(maps)))
        pictures = [frame.to_image(m) for m in maps]
        count = [0]
        hook = wrapper.register_forward_pre_hook(lambda module, args: count.__setitem__(0, count[0] + len(args[0])))
        try:
            with torch.no_grad():
                clean = float(target(wrapper(x)[0]))
            count[0] = 0
            staged, staged_checks = choose_map(wrapper, x, maps, target, "staged", clean=clean)
            staged_images = count[0]
            count[0] = 0
            full_index, checks = choose_map(wrapper, x, maps, target, "full", clean=clean)
            full_images = count[0]
            count[0] = 0
            three, three_checks = staged_kept(3, lambda: choose_map(wrapper, x, maps, target, "staged", clean=clean))
            three_images = count[0]
            count[0] = 0
            fine, _ = choose_map(wrapper, x, maps, target, "staged", (0.05, 0.1, 0.2), clean=clean)
            fine_images = count[0]
            windows = {}
            for cells in (1, 2):
                side = cells * int(wrapper.token_cell)
                if side == PEAK_WINDOW:  # the same call as today's staged choice: its result
                    windows[cells] = (staged, staged_images)
                    continue
                count[0] = 0
                index, _ = choose_map(wrapper, x, maps, target, "staged", clean=clean, peak_window=side)
                windows[cells] = (index, count[0])
            count[0] = 0
            inner = [k for k in range(len(maps)) if not padding_peak(wrapper, frame, maps[k])] or list(range(len(maps)))
            letterbox, _ = choose_map(wrapper, x, maps[inner], target, "staged", clean=clean)
            letterbox, letterbox_images = inner[letterbox], count[0]
            count[0] = 0
            pick, _ = choose_map(wrapper, x, maps[allowed], target, "staged", clean=clean)
            pick, edge_images = allowed[pick], count[0]
        finally:
            hook.remove()
        add("staged (today)", pictures[staged], staged_images, names[staged])
        add("full check", pictures[full_index], full_images, names[full_index])
        checked = [k for k, c in enumerate(staged_checks) if not c.partial and not c.blank]
        add("staged, mean of the 2 checked", mean_map([pictures[k] for k in checked]) if checked
            else pictures[staged], staged_images, "+".join(names[k] for k in checked))
        for cells, label in ((1, "one token cell"), (2, "two token cells")):
            index, images = windows[cells]
            add(f"staged, peak window {label}", pictures[index], images, names[index])
        add("staged, fractions 0.05,0.1,0.2", pictures[fine], fine_images, names[fine])
        add("staged, best 3 checked", pictures[three], three_images, names[three])
        checked = [k for k, c in enumerate(three_checks) if not c.partial and not c.blank]
        add("staged, best 3 checked, their mean", mean_map([pictures[k] for k in checked]) if checked
            else pictures[three], three_images, "+".join(names[k] for k in checked))
        totals = np.array([c.total for c in checks])
        order = ranked(totals)
        for k in (2, 3):
            best = [j for j in order[:k] if np.isfinite(totals[j])] or [order[0]]
            add(f"full, mean of the best {k}", mean_map([pictures[j] for j in best]), full_images,
                "+".join(names[j] for j in best))
        add("staged, no tile-edge peak", pictures[pick], edge_images, names[pick])
        add("staged, no peak next to the letterbox", pictures[letterbox], letterbox_images, names[letterbox])
        hits = [score(p, sample, tolerance) for p in pictures]
        rows.append(dict(base, rule="any candidate", chosen="", images="",
                         pointing=float(max(h["pointing"] for h in hits)),
                         distractor=float(min(h["distractor"] for h in hits)),
                         energy=float(max(h["energy"] for h in hits))))
        inside = [padding_peak(wrapper, frame, m) for m in maps]
        rows.append(dict(base, rule="diagnosis", chosen=names[staged], images="",
                         pointing=float(edges[staged]), distractor=float(sum(edges) / len(edges)),
                         energy=float(inside[staged])))
    return rows


def summary(rows: List[dict]) -> List[dict]:
    """Means per (model, seed, rule), with the rule's gaps to occlusion of the same samples."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], str(r["seed"]), r["rule"]), []).append(r)
    table = []
    for (model, seed, rule), group in groups.items():
        if rule == "diagnosis":
            continue
        reference = {r["sample"]: r for r in groups[(model, seed, "occlusion")]}
        mean = {k: float(np.mean([float(r[k]) for r in group])) for k in ("pointing", "distractor", "energy")}
        occ = {k: float(np.mean([float(reference[r["sample"]][k]) for r in group]))
               for k in ("pointing", "distractor", "energy")}
        images = [float(r["images"]) for r in group if r["images"] not in ("", None)]
        table.append(dict(model=model, seed=seed, n=len(group), rule=rule, pointing=mean["pointing"],
                          distractor=mean["distractor"], energy=mean["energy"],
                          pointing_gap=mean["pointing"] - occ["pointing"],
                          distractor_gap=mean["distractor"] - occ["distractor"],
                          energy_gap=mean["energy"] - occ["energy"],
                          images=float(np.mean(images)) if images else ""))
    return table


def worst_cases(table: List[dict]) -> List[dict]:
    """Per rule and seed: the worst pointing gap and distractor gap over the models, the pairs energy gap, and
    whether the issue's goal holds on every model."""
    out = []
    for seed in sorted({r["seed"] for r in table}, key=lambda s: (len(s), s)):
        for rule in dict.fromkeys(r["rule"] for r in table if r["seed"] == seed and r["model"] in MODELS):
            rs = [r for r in table if r["seed"] == seed and r["rule"] == rule and r["model"] in MODELS]
            pairs = [r["energy_gap"] for r in rs if r["model"] == "pairs"]
            worst_p, worst_d = min(r["pointing_gap"] for r in rs), max(r["distractor_gap"] for r in rs)
            out.append(dict(seed=seed, rule=rule, models=len(rs), worst_pointing_gap=worst_p,
                            worst_distractor_gap=worst_d, pairs_energy_gap=pairs[0] if pairs else "",
                            goal=bool(round(worst_p, 6) >= -0.02 and round(worst_d, 6) <= 0.02
                                      and (not pairs or round(abs(pairs[0]), 6) <= 0.1))))
    return out


# What the tables above say (seed 0: 200 held-out samples per model, the dev_models_gap ones; seed 1: 100 more;
# "0+1" pools them). Rewritten by hand when the rows change.
FINDINGS = """
## Reading

Two onevision models appear: `onevision-v1`, the model shipped until commit faf9e08, on which the issue's gap
(-0.025) was measured (seeds 0 and 1), and `onevision`, the retrained model shipped since (one training canvas in
eight without a red object; seeds 0, 1 and 2). The worst-case tables take the five shipped models (`onevision`, not
`onevision-v1`).

- **The default stays the staged check; nothing here beats it on a second set.** On the five shipped models
  today's default meets the goal on seeds 0 and 1 (and onevision's seed 2): it points at the evidence as often as
  occlusion on onevision (1.000 on seeds 0 / 1 / 2, as occlusion; distractor 0.000), internvl and crosses (seed 1:
  1.000 against 0.990), far more often on demo (0.935 / 0.930 against 0.760 / 0.720), and 0.020 less often on
  pairs' seed 1 (0.980 against 1.000, distractor 0.010: the goal's edge; 1.000 / 0.000 on seed 0). The pairs energy
  gap is -0.049 / -0.073 (goal: within 0.1). Its energy in the evidence box stays well below occlusion's on the
  tiled models (onevision -0.18 to -0.23, internvl -0.12): not part of the goal, and no rule here moves it by more
  than 0.04.
- **On onevision-v1** (what the issue's directions were about) no rule meets the goal on both seeds:
  - the ceiling is not the problem: some candidate's map points at the evidence on 0.990 of the samples (occlusion
    0.947, today 0.920 over 300): the ranking of the candidates misses;
  - **the full check widens the gap**: 0.870 / 0.920 (seeds 0 / 1) against the staged choice's 0.910 / 0.940; per
    sample it loses 10 and wins none against the staged choice (it ties on the other models);
  - **the misses do not peak on the first or last row of a tile**: 2 of the 24 staged misses do (34 % of all chosen
    maps do); 16 peak on a token row of the picture that borders the letterbox (32 % of all chosen maps do too).
    Leaving such maps out loses more hits than it saves (0.860 / 0.910); leaving out every tile-edge peak is far
    worse on every model (worst gaps -0.405 / -0.420, crosses / pairs);
  - **averaging the best-checked maps** closes it (mean of the 3 the staged choice checks: 0.945 / 0.950) but breaks
    the two-object model: the mean of maps peaking on different objects peaks between them or on a distractor (pairs
    0.810 / 0.870, distractor +0.090 / +0.050, energy gap -0.141 / -0.168, outside 0.1);
  - **the check's fractions** (0.05, 0.1, 0.2) win 2 samples and lose 1 (-0.025 / -0.020) for 4 more images;
  - **the peak window** (28 px today: one Qwen token cell, but 3.5 of the tiled models' 8-px token cells): two token
    cells (16 px, occlusion's window there) gave 0.935 on seed 0 (gap 0.000; 7 wins, 2 losses per sample against
    today) and today's choice on every seed-1 sample (0.940, gap -0.030); one cell 0.920 / 0.910. On the Qwen models
    two cells (56 px) ties today's pointing (demo 0.945 / 0.930, crosses 1.000, pairs 1.000 / 0.980). 7 wins to 2
    losses is a sign-test p of 0.18, and on the retrained onevision every rule but the exclusions ties: not a default
    on this evidence. A window tied to the model's token cell, not a constant in pixels, is still what a transfer to
    other families needs; measure it on a model where the staged choice misses.
- Not measured: the causal candidate at token resolution (one token cell's embeddings replaced at the projector
  output, every cell in batches): one decoder pass per token cell (16 to about 100 on these models) against the
  default's 55 to 75 forward images, beyond the 20 % the default may grow, and a per-family hook at the projector.
"""


def compact(rows: List[dict]) -> List[dict]:
    """The sample rows with the energy at 4 decimals and hits and image counts as integers (a smaller file; the
    tables show 3 decimals)."""
    def short(key, value):
        if value in ("", None) or key not in ("pointing", "distractor", "energy", "images"):
            return value
        value = float(value)
        return "nan" if np.isnan(value) else f"{value:.4f}" if key == "energy" else f"{value:g}"
    return [{k: short(k, v) for k, v in r.items()} for r in rows]


def letterbox(values, how=np.mean):
    """``how`` of the diagnosis rows' letterbox flags, "" where they were not recorded (rows from before the flag)."""
    values = [float(v) for v in values]
    if any(np.isnan(v) for v in values):
        return ""
    return float(how(values)) if how is np.mean else int(how(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("collect", "table"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse-occlusion", action="store_true",
                        help="read occlusion's seed-0 scores from dev_models_gap_samples.csv (same shipped model only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = list(csv.DictReader(gzip.open(SAMPLES, "rt", newline=""))) if os.path.exists(SAMPLES) else []
    if args.action == "collect":
        for name in args.models.split(","):
            start = time.perf_counter()
            new = collect(name, args.n, args.seed, args.reuse_occlusion)
            old = [r for r in old if (r["model"], int(r["seed"])) != (name, args.seed)] + new
            with gzip.open(SAMPLES, "wt", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(old[0]))
                writer.writeheader()
                writer.writerows(compact(old))
            print(f"{name}: {time.perf_counter() - start:.0f} s")
    if not old:
        raise SystemExit(f"No sample rows in {SAMPLES}: run collect first (the tables are left as they are).")
    seeds = sorted({str(r["seed"]) for r in old})
    pooled = [dict(r, seed="+".join(seeds), sample=f'{r["seed"]}:{r["sample"]}') for r in old]
    table = summary(old) + (summary(pooled) if len(seeds) > 1 else [])
    table.sort(key=lambda r: (len(r["seed"]), r["seed"], MODELS.index(r["model"]) if r["model"] in MODELS else 9))
    write_csv(os.path.join(HERE, "auto_five_models.csv"), table)
    worst = worst_cases(table)
    diagnosis = [r for r in old if r["rule"] == "diagnosis"]
    header = ("# auto's rule on the five development models (issue 26, deliverable 3)\n\n"
              "Rows collected by `python benchmarks/auto_five_models.py collect --models "
              "onevision,internvl,pairs,crosses,demo --n 200 --seed 0` and `... --n 100 --seed 1`, onevision also "
              "`--n 200 --seed 2` (crosses' seed-0 rows come from a run before the peak-window and letterbox rules "
              "were added, so those rules have no crosses seed-0 rows; internvl's and pairs' seed-0 occlusion scores "
              "were read from `dev_models_gap_samples.csv` as `--reuse-occlusion` does; `onevision-v1`: the "
              "onevision model shipped before commit faf9e08, rows kept under that name), then `python "
              "benchmarks/auto_five_models.py table` (CPU, 1 thread); "
              "see its docstring. Scored on "
              "the picture as in `dev_models_gap.md`: `pointing` the map's maximum on the evidence (pairs: either "
              "object), `distractor` on a distractor, `energy` the share of positive mass in the evidence boxes; "
              "`*_gap` the rule minus occlusion on the same samples; `images` forward images per sample of the "
              "choice.")
    text = markdown(table, header)
    text += "\n" + markdown(worst, "## Worst case over the models per rule (goal: pointing gap >= -0.02, distractor "
                                   "gap <= 0.02 on every model, pairs energy within 0.1)")
    if diagnosis:
        per = []
        for model in dict.fromkeys(r["model"] for r in diagnosis):
            rs = {(r["seed"], r["sample"]): r for r in diagnosis if r["model"] == model}
            staged = {(r["seed"], r["sample"]): r for r in old if r["model"] == model and r["rule"] == "staged (today)"}
            misses = [k for k, r in staged.items() if float(r["pointing"]) < 1]
            per.append(dict(model=model, samples=len(rs),
                            chosen_peaks_on_edge_row=float(np.mean([float(r["pointing"]) for r in rs.values()])),
                            candidates_peaking_on_edge_row=float(np.mean([float(r["distractor"])
                                                                          for r in rs.values()])),
                            misses=len(misses),
                            misses_peaking_on_edge_row=int(sum(float(rs[k]["pointing"]) for k in misses)),
                            chosen_peaks_next_to_letterbox=letterbox(r["energy"] for r in rs.values()),
                            misses_peaking_next_to_letterbox=letterbox((rs[k]["energy"] for k in misses), sum)))
        text += "\n" + markdown(per, "## Where the staged choice's maps peak: on the first or last token row of a "
                                      "tile (of the whole input for the Qwen models), next to the letterbox (a token "
                                      "row or column of the picture bordering the input's padding); `misses`: samples "
                                      "where it does not point at the evidence (counts)")
    text += FINDINGS
    with open(os.path.join(HERE, "auto_five_models.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
