"""Evidence masks (benchmark/masks.py, metrics/localization.py, the runner's mask columns): pointing and energy on a
mask that fills a box equal those on the box, COCO RLE and polygons decode without pycocotools, bad masks name their
row."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from pytorch_grad_cam_vlm import build_tiny_model, cli
from pytorch_grad_cam_vlm.benchmark import data as bench_data
from pytorch_grad_cam_vlm.benchmark.masks import decode_rle, encode_rle, pixel_mask, rle_counts, rle_string
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.metrics.localization import energy_in_box, energy_in_mask, pointing_hit, pointing_in_mask

PROMPT = "What color is the circle?"


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical results need one thread count


def box_mask(box, shape):
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def test_mask_pointing_and_energy_equal_box_ones_when_the_mask_is_the_box():
    rng = np.random.default_rng(0)
    for trial in range(300):
        cam = rng.random((30, 40))
        if trial % 3 == 0:
            cam = np.kron(rng.random((3, 4)), np.ones((10, 10)))  # plateaus: the peak at a plateau's centre
        if trial % 7 == 0:
            cam = np.zeros((30, 40))  # blank: points nowhere
        x0, y0 = int(rng.integers(0, 39)), int(rng.integers(0, 29))
        box = (x0, y0, int(rng.integers(x0 + 1, 41)), int(rng.integers(y0 + 1, 31)))
        tolerance = [0, 2.5, 3, 14][trial % 4]
        mask = box_mask(box, cam.shape)
        assert pointing_in_mask(cam, mask, tolerance) == pointing_hit(cam, box, tolerance), (trial, box, tolerance)
        assert energy_in_mask(cam, mask) == pytest.approx(energy_in_box(cam, box))


def test_coco_rle_decodes_as_pycocotools_encodes():
    # Worked by hand from pycocotools' rleToString: 40 -> "X1" (5-bit groups, continuation bit 0x20), the fourth
    # count stored as 2 - 40 = -38 -> "jN" (sign bit 0x10).
    assert rle_counts("0X1:jN") == [0, 40, 10, 2]
    assert rle_string([0, 40, 10, 2]) == "0X1:jN"
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((13, 7)) < rng.random()
        rle = encode_rle(mask)
        assert np.array_equal(decode_rle(rle), mask)
        counts = rle_counts(rle["counts"])
        assert np.array_equal(decode_rle({"size": [13, 7], "counts": counts}), mask)  # uncompressed counts
    mask = decode_rle({"size": [3, 4], "counts": [2, 3, 7]})  # column-major, zeros first
    assert np.array_equal(mask, np.array([[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=bool))


def write_rows(folder, rows, size=(56, 84)):
    """Images im0.png, ... and a data.jsonl; a row's ``masks`` given as boxes become PNG files of those boxes."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            image = (np.random.RandomState(i).rand(*size, 3) * 255).astype(np.uint8)
            Image.fromarray(image).save(os.path.join(folder, f"im{i}.png"))
            row = dict(row)
            if "mask_boxes" in row:
                row["masks"] = []
                for k, (box, shape) in enumerate(row.pop("mask_boxes")):
                    Image.fromarray(box_mask(box, shape).astype(np.uint8) * 255).save(
                        os.path.join(folder, f"mask{i}_{k}.png"))
                    row["masks"].append(f"mask{i}_{k}.png")
            f.write(json.dumps(dict(image=f"im{i}.png", **row)) + "\n")
    return path


def test_benchmark_mask_columns_equal_box_columns(tmp_path):
    """A run whose rows carry, beside each box, a mask PNG of that box gives mask_pointing == pointing and
    mask_energy == energy on every row; rows without masks leave the mask columns empty."""
    build_tiny_model(tmp_path / "tiny", seed=0)
    boxes = [[[0, 0, 28, 28]], [[28, 0, 84, 28], [0, 28, 28, 56]], [[50, 10, 60, 50]]]
    rows = [dict(prompt=PROMPT, boxes=b, mask_boxes=[(box, (56, 84)) for box in b]) for b in boxes]
    rows.append(dict(prompt=PROMPT, boxes=[[0, 0, 28, 28]]))
    path = write_rows(str(tmp_path / "data"), rows)
    out = tmp_path / "out"
    assert cli.main(["benchmark", "--model", str(tmp_path / "tiny"), "--data", path, "--out", str(out), "--layers",
                     "0,1", "--methods", "GradCAM", "--percentiles", "50", "--auc-steps", "4", "--no-sanity"]) == 0
    with open(out / "per_sample.csv") as f:
        results = list(csv.DictReader(f))
    assert len(results) == 16
    for row in results:
        if row["sample"] == "3":
            assert row["mask_pointing"] == row["mask_energy"] == ""
            continue
        assert row["mask_pointing"] == row["pointing"]
        assert float(row["mask_energy"]) == pytest.approx(float(row["energy"]), abs=1e-6)
        assert 0 <= float(row["deletion_auc"]) <= 1 and 0 <= float(row["insertion_auc"]) <= 1
    assert "mask pointing" in (out / "benchmark.md").read_text()


@pytest.mark.parametrize("mask_boxes, message", [
    ([((0, 0, 28, 28), (56, 80))], "data.jsonl line 2: masks[0]: mask1_0.png is 80x56, the image 84x56"),
    ([((0, 0, 28, 28), (56, 84)), ((0, 0, 0, 0), (56, 84))], "data.jsonl line 2: masks[1]: mask1_1.png is empty"),
])
def test_bad_masks_name_their_row(tmp_path, capsys, mask_boxes, message):
    path = write_rows(str(tmp_path / "data"), [dict(prompt=PROMPT), dict(prompt=PROMPT, mask_boxes=mask_boxes)])
    code = cli.main(["benchmark", "--model", "demo", "--data", path, "--out", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_coco_segmentations_are_the_samples_masks(tmp_path):
    folder = tmp_path / "data"
    write_rows(str(folder), [dict(prompt=PROMPT)])
    cat = box_mask((10, 5, 30, 35), (56, 84))
    coco = dict(images=[dict(id=7, file_name="im0.png")], categories=[dict(id=1, name="cat"), dict(id=2, name="dog")],
                annotations=[dict(image_id=7, category_id=1, bbox=[10, 5, 20, 30], segmentation=encode_rle(cat)),
                             dict(image_id=7, category_id=2, bbox=[40, 0, 10, 10],
                                  segmentation=[[40, 0, 49, 0, 49, 9, 40, 9]])])
    path = folder / "coco.json"
    path.write_text(json.dumps(coco))
    samples = bench_data.load_samples(str(path))
    assert [len(s.masks) for s in samples] == [1, 1]
    assert np.array_equal(pixel_mask(samples[0].masks, (84, 56), (56, 84), "cat"), cat)
    # PIL fills the polygon with its outline: the pixels 40..49 x 0..9, the box's.
    assert np.array_equal(pixel_mask(samples[1].masks, (84, 56), (56, 84), "dog"), box_mask((40, 0, 50, 10), (56, 84)))
    assert np.array_equal(pixel_mask(samples[0].masks, (84, 56), (28, 42), "cat"), cat[1::2, 1::2])  # nearest
    coco["annotations"][0]["segmentation"] = encode_rle(np.ones((56, 80), dtype=bool))
    path.write_text(json.dumps(coco))
    with pytest.raises(InputError, match=r"coco.json images\[0\] \(id 7, category 'cat'\): masks\[0\]: the RLE mask "
                                         r"is 80x56, the image 84x56"):
        bench_data.load_samples(str(path))
