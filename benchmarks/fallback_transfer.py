"""Does ``explain``'s occlusion fallback help, on the five development models and on one that chose nothing (issue 26)?

Per held-out sample, with the answer as the target: ``explain``'s default with and without the fallback
(``fallback=False``: the gradient candidates' choice alone), each map scored on the picture as
``benchmarks/dev_models_gap.py`` scores it (the maximum on the evidence or on a distractor, within half a token cell),
and whether its check fails where the answer depends on the image (visual reliance gives no warning). ``colors`` (the
demo task asked about any colour, the model of the prompt's words) chose no default of ``explain``: a transfer check.

    python benchmarks/fallback_transfer.py colors 200     # model, held-out samples; writes fallback_transfer_colors.csv
    python benchmarks/fallback_transfer.py                # summarises every fallback_transfer_*.csv present
"""
from __future__ import annotations

import numpy as np

from auto_layer import geometry, held_out_cases, markdown
from dev_models_gap import score
from verdict_null import command, measured_runs, write_summary
from pytorch_grad_cam_vlm.methods.auto import OCCLUSION, explain


def measure(name: str, n: int, seed: int) -> list:
    """One row per held-out sample of model ``name`` (see the module's docstring)."""
    tolerance = geometry(name)[1]
    rows = []
    for i, sample, wrapper, x, target in held_out_cases(name, n, seed):
        row = dict(model=name, sample=i)
        for label, fallback in (("without", False), ("with", True)):
            result = explain(wrapper, x, [target], image_size=sample.image.shape[:2], fallback=fallback)
            hits = score(result.maps[0], sample, tolerance)
            reliant = not result.reliance[0].prompt_only
            row.update({f"{label}_pointing": hits["pointing"], f"{label}_distractor": hits["distractor"],
                        f"{label}_flagged": int(reliant and result.checks[0].failed), "image_reliant": int(reliant)})
        row["occlusion_kept"] = int(result.methods[0] == OCCLUSION)
        rows.append(row)
    return rows


def summarise() -> None:
    table = []
    for rows in measured_runs("fallback_transfer"):
        reliant = [r for r in rows if r["image_reliant"] == "1"]
        out = dict(model=rows[0]["model"], n=len(rows), occlusion_kept=sum(int(r["occlusion_kept"]) for r in rows))
        for label in ("without", "with"):
            out[f"{label}_pointing"] = float(np.mean([float(r[f"{label}_pointing"]) for r in rows]))
            out[f"{label}_distractor"] = float(np.mean([float(r[f"{label}_distractor"]) for r in rows]))
            out[f"{label}_flagged"] = float(np.mean([int(r[f"{label}_flagged"]) for r in reliant])) if reliant \
                else float("nan")
        table.append(out)
    write_summary("fallback_transfer.md", markdown(
        table, "# The occlusion fallback, on and off\n\nWritten by `python benchmarks/fallback_transfer.py MODEL N` "
               "(CPU, one thread; seed 0); see its docstring. `occlusion_kept`: samples whose map is the fallback's; "
               "`*_pointing` / `*_distractor`: the map's maximum on the evidence / on a distractor (the picture, "
               "half a token cell of tolerance); `*_flagged`: of the samples whose answer depends on the image, the "
               "share whose map fails its check. `colors` chose no default: a transfer check."))


if __name__ == "__main__":
    command("fallback_transfer", measure, summarise, 0)
