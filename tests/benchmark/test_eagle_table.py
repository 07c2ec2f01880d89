"""EAGLE's evaluation (``--auc-protocol eagle --table eagle``) on a COCO-style file with boxes and masks per word, on a
tiny Qwen2.5-VL and on the demo model with the demo data: the table's cells are the run's summary, the target is the
word's first token, the GPU memory is measured on CUDA only, other protocols are refused."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from pytorch_grad_cam_vlm import build_tiny_model, cli
from pytorch_grad_cam_vlm.benchmark import data as bench_data
from pytorch_grad_cam_vlm.benchmark.eagle_table import COLUMNS
from pytorch_grad_cam_vlm.benchmark.scorer import peak_memory

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--methods", "GradCAM", "--percentiles", "50", "--no-sanity", "--bootstrap", "200", "--tolerance", "0"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_coco(folder):
    """Two 56x84 images; 'circle' on both, 'square' on the first; a polygon mask per annotation (a triangle inside
    its box, so mask and box pointing can differ)."""
    os.makedirs(folder, exist_ok=True)
    for i in range(2):
        image = (np.random.RandomState(i).rand(56, 84, 3) * 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(folder, f"im{i}.png"))
    triangle = lambda x, y, w, h: [[x, y, x + w, y, x, y + h]]
    annotations = [dict(image_id=1, category_id=1, bbox=[0, 0, 40, 30], segmentation=triangle(0, 0, 40, 30)),
                   dict(image_id=1, category_id=2, bbox=[50, 20, 30, 30], segmentation=triangle(50, 20, 30, 30)),
                   dict(image_id=2, category_id=1, bbox=[20, 10, 60, 40], segmentation=triangle(20, 10, 60, 40))]
    coco = dict(images=[dict(id=1, file_name="im0.png"), dict(id=2, file_name="im1.png")],
                categories=[dict(id=1, name="circle"), dict(id=2, name="square")], annotations=annotations)
    path = os.path.join(folder, "coco.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_eagle_model")
    build_tiny_model(path, seed=0)
    return str(path)


def table_rows(text):
    """The data rows of a markdown table: model, method, layer -> cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 + len(COLUMNS) and cells[0] != "model":
            rows[tuple(cells[:3])] = cells[3:]
    return rows


def expected_cells(summary_row):
    """The table's cells computed from a summary.csv row: mean [low, high], 3 decimals; "–" where empty."""
    cells = []
    for column in COLUMNS:
        value = summary_row[column]
        if value in ("", "nan"):
            cells.append("–")
        elif column == "peak_memory_gib" or summary_row[f"{column}_low"] == "":
            cells.append(f"{float(value):.3f}")
        else:
            cells.append(f"{float(value):.3f} [{float(summary_row[column + '_low']):.3f}, "
                         f"{float(summary_row[column + '_high']):.3f}]")
    return cells


def test_eagle_command_on_coco_boxes_and_masks(tmp_path, tiny_path, device, capsys):
    data = write_coco(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    assert cli.main(["benchmark", "--model", tiny_path, "--data", data, "--out", out, "--layers", "1",
                     "--auc-protocol", "eagle", "--table", "eagle", "--coco-answer", "{category}",
                     "--coco-prompt", "Name the {category}.", "--device", str(device)] + FAST) == 0
    capsys.readouterr()
    rows = read_csv(os.path.join(out, "per_sample.csv"))
    summary = read_csv(os.path.join(out, "summary.csv"))
    # The target is the first token of the word (COCO's category name), as EAGLE explains a word.
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    words = ["circle", "square", "circle"]
    assert [int(r["target_token"]) for r in rows if r["method"] == "GradCAM"] == [
        tokenizer.encode(w, add_special_tokens=False)[0] for w in words]
    # Box and mask pointing both apply (COCO's polygons are the masks); memory only on CUDA.
    assert all(r["pointing"] in "01" and r["mask_pointing"] in "01" for r in rows)
    if device.type == "cpu":
        assert all(r["peak_memory_gib"] == "" for r in rows)
    else:
        assert all(0 < float(r["peak_memory_gib"]) < torch.cuda.get_device_properties(0).total_memory / 2 ** 30
                   for r in rows)
    with open(os.path.join(out, "eagle_table.md")) as f:
        table = f.read()
    cells = table_rows(table)
    assert set(cells) == {("tiny_eagle_model0", r["method"], r["layer"]) for r in summary}
    for row in summary:
        assert cells["tiny_eagle_model0", row["method"], row["layer"]] == expected_cells(row)
    assert "pointing tolerance 0 px" in table


def test_eagle_table_is_refused_for_another_protocol_and_nothing_is_written(tmp_path, tiny_path, capsys):
    data = write_coco(str(tmp_path / "data"))
    out = tmp_path / "run"
    code = cli.main(["benchmark", "--model", tiny_path, "--data", data, "--out", str(out), "--layers", "1",
                     "--table", "eagle"] + FAST)
    assert code != 0 and not out.exists()
    assert ("--table eagle: EAGLE's table reports EAGLE's protocol; this run has auc_protocol 'black'. Run with "
            "--auc-protocol eagle") in capsys.readouterr().err
    code = cli.main(["benchmark", "--model", tiny_path, "--data", data, "--out", str(out), "--layers", "1",
                     "--coco-answer", "{name}"] + FAST)
    assert code != 0 and not out.exists()
    assert "--coco-answer '{name}': the one placeholder it takes is {category} (KeyError('name'))." in \
        capsys.readouterr().err


def test_eagle_tables_of_two_models_demo_data(tmp_path, tiny_path, capsys):
    """The demo model on the demo data (JSONL: boxes, no masks) and the tiny model on COCO, one table."""
    demo_data = bench_data.write_demo_dataset(str(tmp_path / "demo_data"), 2, seed=0)
    demo_run = str(tmp_path / "demo_run")
    assert cli.main(["benchmark", "--model", "demo", "--data", demo_data, "--out", demo_run, "--layers", "0",
                     "--auc-protocol", "eagle", "--table", "eagle", "--device", "cpu"] + FAST) == 0
    tiny_run = str(tmp_path / "tiny_run")
    assert cli.main(["benchmark", "--model", tiny_path, "--data", write_coco(str(tmp_path / "data")), "--out",
                     tiny_run, "--layers", "1", "--auc-protocol", "eagle", "--table", "eagle", "--device",
                     "cpu"] + FAST) == 0
    capsys.readouterr()
    assert cli.main(["benchmark", "--eagle-table", demo_run, tiny_run]) == 0
    cells = table_rows(capsys.readouterr().out)
    for run, model in ((demo_run, "demo"), (tiny_run, "tiny_eagle_model0")):
        for row in read_csv(os.path.join(run, "summary.csv")):
            assert cells[model, row["method"], row["layer"]] == expected_cells(row)
    # No masks in the demo data: its mask column is "–".
    assert all(c[3] == "–" for (model, _, _), c in cells.items() if model == "demo")
    # A run under another protocol is refused by name.
    other = str(tmp_path / "other_run")
    shutil.copytree(tiny_run, other)
    with open(os.path.join(other, "settings.json")) as f:
        settings = json.load(f)
    settings["auc_steps"] = 20
    with open(os.path.join(other, "settings.json"), "w") as f:
        json.dump(settings, f)
    assert cli.main(["benchmark", "--eagle-table", tiny_run, other]) != 0
    assert f"{other}: EAGLE's table reports EAGLE's protocol; this run has auc_steps 20." in capsys.readouterr().err


def test_peak_memory_is_measured_on_cuda_only(device):
    with peak_memory(device) as memory:
        block = torch.ones(64, 2 ** 20, device=device)  # 256 MiB of float32
    assert memory.gib is None if device.type == "cpu" else memory.gib >= 0.25
    del block
