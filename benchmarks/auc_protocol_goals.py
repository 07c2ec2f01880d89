"""The deletion / insertion protocols on the two development models: README's example benchmark run per model and
protocol, then the issue's goals read from its per-sample rows (``auc_protocol_goals.md``).

    python benchmarks/auc_protocol_goals.py --n 16 --protocols black,rise,eagle,blur --out /tmp/goals

Per model and protocol: whether the deletion and insertion AUCs separate GradCAM++ at layer 0 from RandomCAM at
layer 0 (disjoint bootstrap 95 % intervals over samples), the same for the map ROAD combined ranks best against
RandomCAM at its layer, and the Spearman correlation of insertion - deletion AUC
with ROAD combined over every method x layer, as benchmark.md computes it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os

from scipy.stats import spearmanr

from pytorch_grad_cam_vlm import cli
from pytorch_grad_cam_vlm.benchmark.data import write_demo_dataset

METHODS = "GradCAM,HiResCAM,GradCAMPlusPlus,LayerCAM"


def write_crosses_dataset(out_dir: str, n: int) -> str:
    """The crosses model's held-out samples as the benchmark's JSONL (as write_demo_dataset writes the demo's)."""
    from PIL import Image

    from pytorch_grad_cam_vlm.demo.crosses import make_crosses_samples

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "data.jsonl")
    with open(path, "w") as f:
        for i, sample in enumerate(make_crosses_samples(n, seed=0, split="test")):
            image = os.path.join("images", f"{i:05d}.png")
            Image.fromarray(sample.image).save(os.path.join(out_dir, image))
            f.write(json.dumps(dict(image=image, prompt=sample.prompt, answer=sample.answer,
                                    boxes=[list(sample.evidence_box)],
                                    distractor_boxes=[list(b) for b in sample.distractor_boxes])) + "\n")
    return path


def read(path: str):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def goals(out: str) -> str:
    """One markdown line of the goals of a finished run folder."""
    summary = {(r["method"], r["layer"]): r for r in read(os.path.join(out, "summary.csv"))}
    pairs = [r for r in summary.values() if r["method"] != "RandomCAM"]
    best = max(pairs, key=lambda r: float(r["road_combined"]))
    cells = []
    for grad in (summary[("GradCAMPlusPlus", "0")], best):
        random_cam = summary[("RandomCAM", grad["layer"])]
        for metric in ("deletion_auc", "insertion_auc"):
            apart = float(grad[f"{metric}_high"]) < float(random_cam[f"{metric}_low"]) or \
                float(random_cam[f"{metric}_high"]) < float(grad[f"{metric}_low"])
            cells.append(f"{float(grad[metric]):.3f} [{float(grad[metric + '_low']):.3f}, "
                         f"{float(grad[metric + '_high']):.3f}] vs {float(random_cam[metric]):.3f} "
                         f"[{float(random_cam[metric + '_low']):.3f}, {float(random_cam[metric + '_high']):.3f}]: "
                         + ("separated" if apart else "not separated"))
    cells.insert(2, f"{best['method']} {best['layer']}")
    rho = spearmanr([float(r["road_combined"]) for r in pairs],
                    [float(r["insertion_auc"]) - float(r["deletion_auc"]) for r in pairs])[0]
    flagged = sum(round(float(r["saturated"]) * int(r["n"])) for r in summary.values())
    total = sum(int(r["n"]) for r in summary.values())
    return " | ".join(cells) + f" | {rho:+.2f} | {flagged} of {total} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--protocols", default="black")
    parser.add_argument("--models", default="demo,crosses")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--percentiles", default="10,20,30,40,50,60,70,80,90")
    parser.add_argument("--out", default="/tmp/auc_protocol_goals")
    args = parser.parse_args()
    lines = ["| model | protocol | deletion AUC: GradCAM++ 0 vs RandomCAM 0 | insertion AUC: GradCAM++ 0 vs RandomCAM 0 "
             "| best map by ROAD combined | its deletion AUC vs RandomCAM's at its layer | its insertion AUC vs "
             "RandomCAM's | Spearman with ROAD combined | rows flagged |", "|---|---|---|---|---|---|---|---|---|"]
    for model in args.models.split(","):
        data = os.path.join(args.out, f"{model}_data")
        path = write_demo_dataset(data, args.n) if model == "demo" else write_crosses_dataset(data, args.n)
        for name in args.protocols.split(","):
            out = os.path.join(args.out, f"{model}_{name}")
            assert cli.main(["benchmark", "--model", model, "--data", path, "--methods", args.methods, "--layers",
                             "all", "--out", out, "--auc-protocol", name, "--no-sanity", "--percentiles",
                             args.percentiles]) == 0
            lines.append(f"| {model} | {name} | " + goals(out))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
