"""``explain --images a b``: the images in one prompt, the report's split (each image's share of the map's mass and
its own deletion check) equal to the API's, each image's map on its own picture; bad input: exit code 2, one line,
nothing written."""
import json

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import LlavaWrapper, QwenVLWrapper, build_tiny_llava, build_tiny_mistral3, explain
from pytorch_grad_cam_vlm.cli import main
from pytorch_grad_cam_vlm.models.multi_image import MultiImage
from pytorch_grad_cam_vlm.models.registry import load_model

PROMPT = "What color is the circle?"
ERROR = "pytorch-grad-cam-vlm: error: "


@pytest.fixture(scope="module")
def mistral3_dir(tmp_path_factory):
    """A tiny Mistral 3, a family that takes one image per prompt."""
    folder = tmp_path_factory.mktemp("mistral3")
    build_tiny_mistral3(folder)
    return str(folder)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two photos of different sizes and aspect ratios."""
    folder = tmp_path_factory.mktemp("photos")
    paths = [str(folder / "wide.png"), str(folder / "tall.png")]
    Image.fromarray(random_image(50, 90, seed=1)).save(paths[0])
    Image.fromarray(random_image(80, 45, seed=2)).save(paths[1])
    return paths


def test_the_report_splits_the_map_between_the_images_as_the_api_does(tiny_qwen_dir, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["explain", "--model", tiny_qwen_dir, "--images", *photos, "--prompt", PROMPT, "--method", "GradCAM",
                 "--layers", "1", "--out", str(out), "--device", "cpu", "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    [row] = json.loads((out / "report.json").read_text())
    assert row["image"] == ";".join(photos) and row["images"] == photos and row["layers"] == [1]
    assert all((out / name).is_file() for name in row["files"])
    model, processor = load_model(tiny_qwen_dir, "qwen2_5_vl", torch.float32, torch.device("cpu"))
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    with torch.no_grad():
        token = int(wrapper(wrapper.preprocess(photos)).argmax())
    [split] = explain(wrapper, MultiImage(photos), [ClassifierOutputTarget(token)], "GradCAM", "1").split
    np.testing.assert_allclose(row["image_shares"], split.shares, atol=1e-6)
    np.testing.assert_allclose(row["image_check"], [c.score for c in split.checks], atol=1e-6)
    assert row["image_verdict"] == [c.verdict for c in split.checks]
    saved = [np.load(out / name) for name in row["files"] if name.endswith(".npy")]
    for photo, m, expected in zip(photos, saved, split.maps):
        assert m.shape == np.asarray(Image.open(photo)).shape[:2]
        np.testing.assert_allclose(m, expected, atol=1e-6)
    assert row["files"][0].endswith("_images.png") and Image.open(out / row["files"][0]).format == "PNG"


def test_a_llava_onevision_model_takes_the_images_as_the_api_does(photos, tmp_path, capsys):
    folder = tmp_path / "onevision"
    model, processor = build_tiny_llava(folder, family="llava_onevision", seed=0)
    out = tmp_path / "out"
    code = main(["explain", "--model", str(folder), "--images", *photos, "--prompt", PROMPT, "--method", "GradCAM",
                 "--layers", "1", "--out", str(out), "--device", "cpu", "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    [row] = json.loads((out / "report.json").read_text())
    assert row["images"] == photos
    wrapper = LlavaWrapper(model, processor, prompt=PROMPT)
    with torch.no_grad():
        token = int(wrapper(wrapper.preprocess(photos)).argmax())
    [split] = explain(wrapper, MultiImage(photos), [ClassifierOutputTarget(token)], "GradCAM", "1").split
    np.testing.assert_allclose(row["image_shares"], split.shares, atol=1e-6)
    np.testing.assert_allclose(sum(row["image_shares"]), 1.0, atol=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--images", "{wide}"], "--images takes two or more image files asked in one prompt, got one: pass it with "
                             "--image."),
    (["--images", "{wide}", "{folder}"], "--images takes image files, got {folder}: pass the folder's images by "
                                         "name."),
    (["--images", "{wide}", "{long}"], "{long} is 1000x4 pixels: an aspect ratio over 200 cannot be resized onto "
                                       "the model's token grid; crop it first."),
    (["--images", "{wide}", "{tall}", "--mode", "grid"], "--images draws the chosen map as one overlay per image; "
                                                          "leave out --mode grid."),
    (["--images", "{wide}", "{tall}", "--per-token"], "--per-token explains one image's answer token by token; "
                                                       "leave it out with --images."),
    (["--images", "{wide}", "{tall}", "--model", "{mistral3}"],
     "--images: a mistral3 model takes one image per prompt; several images in one prompt work with Qwen2-VL, "
     "Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V, InternVL, Idefics3 / SmolVLM, LLaVA 1.5, LLaVA-NeXT, LLaVA-OneVision "
     "and Gemma 3 (without pan-and-scan)."),
])
def test_bad_input_exits_with_one_line_and_writes_nothing(tiny_qwen_dir, mistral3_dir, photos, tmp_path, capsys, flags,
                                                          message):
    long = tmp_path / "long.png"
    Image.fromarray(random_image(4, 1000)).save(long)
    names = dict(wide=photos[0], tall=photos[1], folder=str(tmp_path), long=str(long), mistral3=mistral3_dir)
    flags = [flag.format(**names) for flag in flags]
    model = flags[flags.index("--model") + 1] if "--model" in flags else tiny_qwen_dir
    flags = [f for i, f in enumerate(flags) if f != "--model" and (i == 0 or flags[i - 1] != "--model")]
    out = tmp_path / "out"
    code = main(["explain", "--model", model, "--prompt", PROMPT, "--out", str(out), *flags])
    assert code == 2
    assert capsys.readouterr().err.strip() == ERROR + message.format(**names)
    assert not out.exists()
