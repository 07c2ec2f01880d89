"""The pytorch-grad-cam-vlm command end to end on tiny models saved to disk: files written, report contents, maps
equal to direct grad-cam calls, and exit code 2 with one line and nothing written for bad input."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import QwenVLWrapper
from pytorch_grad_cam_vlm.cli import common, main
from pytorch_grad_cam_vlm.methods.auto import explain
from pytorch_grad_cam_vlm.metrics.deletion_check import check_maps
from pytorch_grad_cam_vlm.metrics.null import NULL_MAPS
from pytorch_grad_cam_vlm.models.registry import load_model
from pytorch_grad_cam_vlm.visualize import figure_size, words_strip

PROMPT = "What color is the circle?"
ERROR = "pytorch-grad-cam-vlm: error: "


@pytest.fixture(scope="module")
def model_dir(tiny_qwen_dir):
    return tiny_qwen_dir


@pytest.fixture(scope="module")
def wrapper(model_dir):
    """The reference: the saved model loaded as the CLI loads it, wrapped by hand."""
    model, processor = load_model(model_dir, "qwen2_5_vl", torch.float32, torch.device("cpu"))
    return QwenVLWrapper(model, processor, prompt=PROMPT)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(random_image(56, 84, seed=1)).save(folder / "b.png")
    Image.fromarray(random_image(84, 56, seed=2)).save(folder / "a.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image, skipped")
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def staging_left(folder):
    return [name for name in os.listdir(folder) if name.startswith(".pytorch-grad-cam-vlm")]


def reference(wrapper, image, method=GradCAM, layers=(1,), **options):
    """Predicted token, its probability and the per-layer maps (decoder layer indices or ``"projector"``), by hand."""
    x = wrapper.preprocess(image)
    with torch.no_grad():
        probabilities = wrapper(x)[0].softmax(-1)
    index = int(probabilities.argmax())
    maps = []
    for layer in layers:
        module = wrapper.merger if layer == "projector" else wrapper.decoder_layers[layer]
        with method(model=wrapper, target_layers=[module],
                    reshape_transform=wrapper.reshape_transform, **options) as cam:
            maps.append(cam(x, [ClassifierOutputTarget(index)])[0])
    return wrapper.processor.tokenizer.decode([index]), float(probabilities[index]), np.stack(maps)


def test_a_random_method_reports_its_stability(capsys, tmp_path, model_dir, image_dir, wrapper):
    """``--method RandomCAM``: the report's ``stability`` is the correlation of the map with a second draw, by hand
    (numpy's generator seeded as the command finds it), and its verdict says ``unstable``."""
    from pytorch_grad_cam import RandomCAM

    from pytorch_grad_cam_vlm.metrics.map_check import STABILITY_FLOOR

    image = os.path.join(image_dir, "a.jpg")
    np.random.seed(2)
    code, _, _ = run(capsys, "explain", "--model", model_dir, "--image", image, "--prompt", PROMPT, "--method",
                     "randomcam", "--layers", "1", "--out", tmp_path / "out")
    assert code == 0
    [row] = json.loads((tmp_path / "out" / "report.json").read_text())
    np.random.seed(2)
    token, _, first = reference(wrapper, image, method=RandomCAM)
    _, _, second = reference(wrapper, image, method=RandomCAM)
    stability = float(np.corrcoef(first[0].ravel(), second[0].ravel())[0, 1])
    assert row["stability"] == [pytest.approx(stability, abs=1e-3)]
    assert stability < STABILITY_FLOOR and row["verdict"] == ["unstable"]  # this seed's two draws: -0.56


def test_explain_folder_writes_grids_maps_and_report(capsys, tmp_path, model_dir, image_dir, wrapper):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "explain", "--model", model_dir, "--image", image_dir, "--prompt", PROMPT,
                          "--method", "gradcam", "--layers", "auto", "--mode", "grid", "--out", out)
    assert code == 0
    assert str(out) in stdout
    report = json.loads((out / "report.json").read_text())
    assert [os.path.basename(r["image"]) for r in report] == ["a.jpg", "b.png"]
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    for row, line in zip(report, table):
        assert row["method"] == "GradCAM" and row["mode"] == "grid"
        assert row["layers"] == ["projector", 0, 1, 2]  # 'auto' on 4 decoder layers: the projector, all but the last
        stem = os.path.splitext(os.path.basename(row["image"]))[0]
        token, probability, maps = reference(wrapper, row["image"], layers=["projector", 0, 1, 2])
        assert row["predicted_token"] == token
        assert row["probability"] == pytest.approx(probability, abs=1e-6)
        np.testing.assert_allclose(np.load(out / row["files"][1]), maps, atol=1e-5)
        x = wrapper.preprocess(row["image"])
        index = wrapper.processor.tokenizer.convert_tokens_to_ids(token)
        checks = check_maps(wrapper, x, maps, ClassifierOutputTarget(index), null=NULL_MAPS)  # by hand, with the null
        assert row["check"] == pytest.approx([c.score for c in checks], abs=1e-5)
        assert row["peak_drop"] == pytest.approx([c.peak_drop for c in checks], abs=1e-5)
        assert row["verdict"] == [c.verdict for c in checks]
        assert row["null_margin"] == [None if np.isnan(c.null_margin) else pytest.approx(c.null_margin, abs=1e-3)
                                      for c in checks]
        assert row["stability"] == [None] * 4  # GradCAM is deterministic: not redrawn
        chosen = row["layers"][int(np.nanargmax([c.total for c in checks]))]  # every mode adds auto's overlay
        suffix = "projector" if chosen == "projector" else f"layer{chosen}"
        assert row["files"] == [f"{stem}_GradCAM_grid.png", f"{stem}_GradCAM_maps.npy",
                                f"{stem}_GradCAM_{suffix}_overlay.png"]
        height, width = maps.shape[1:]
        strip = words_strip(row["prompt_words"], row["word_occlusion"], figure_size(2, 3, height, width)[0])
        assert Image.open(out / row["files"][0]).size == tuple(np.add(figure_size(2, 3, height, width),
                                                                      (0, len(strip))))  # the prompt's words under it
        assert line == {k: ";".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in row.items()}
    assert sorted(os.listdir(out)) == sorted(["report.json", "report.csv"] + sum((r["files"] for r in report), []))
    assert staging_left(tmp_path) == []


def test_explain_single_with_smooth_method_into_existing_folder(capsys, tmp_path, model_dir, image_dir, wrapper):
    from pytorch_grad_cam_vlm.methods.smooth_grad import SmoothGradCAM

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("kept")
    image = image_dir / "b.png"
    code, _, _ = run(capsys, "explain", "--model", model_dir, "--image", image, "--prompt", PROMPT,
                     "--method", "SmoothGradCAM", "--n-samples", 2, "--noise-level", 0.1, "--seed", 3,
                     "--mode", "single", "--out", out, "--dtype", "float32", "--device", "cpu")
    assert code == 0
    [row] = json.loads((out / "report.json").read_text())
    [layer] = row["layers"]  # the candidate layer of the highest total on the deletion check
    candidate_layers = ["projector", 0, 1, 2]
    _, _, candidates = reference(wrapper, str(image), SmoothGradCAM, layers=candidate_layers, n_samples=2,
                                 noise_level=0.1, seed=3)
    x = wrapper.preprocess(str(image))
    target = ClassifierOutputTarget(int(wrapper(x).argmax()))
    checks = check_maps(wrapper, x, candidates, target)
    best = int(np.nanargmax([c.total for c in checks]))
    assert layer == candidate_layers[best] and row["check"] == pytest.approx([checks[best].score], abs=1e-5)
    assert row["candidates"] == "SmoothGradCAM x layers projector,0,1,2"
    suffix = "projector" if layer == "projector" else f"layer{layer}"
    assert row["files"] == ["b_SmoothGradCAM_single.png", "b_SmoothGradCAM_maps.npy",
                            f"b_SmoothGradCAM_{suffix}_overlay.png"]
    _, _, maps = reference(wrapper, str(image), SmoothGradCAM, layers=[layer], n_samples=2, noise_level=0.1, seed=3)
    np.testing.assert_allclose(np.load(out / row["files"][1]), maps, atol=1e-5)
    assert Image.open(out / row["files"][2]).size == (84, 56)
    assert (out / "keep.txt").read_text() == "kept"


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, model_dir, image_dir):
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("bad")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(folder / "bert")
    (folder / "empty").mkdir()
    good = dict(model=model_dir, image=str(image_dir / "b.png"), prompt=PROMPT)
    return folder, good


@pytest.mark.parametrize("change, message", [
    (dict(image="{bad}/missing.png"), "Image file or folder not found"),
    (dict(image="{bad}/broken.png"), "Cannot read"),
    (dict(image="{bad}/empty"), "No image files"),
    (dict(method="GradCan"), "Unknown method 'GradCan'"),
    (dict(method="FullGrad"), "not supported"),
    (dict(method="ShapleyCAM", layers="1,2"), "one target layer per call"),
    (dict(layers="9"), "Layer 9 does not exist"),
    (dict(layers="3"), "last layer"),
    (dict(layers="deep"), "Unknown layer choice"),
    (dict(layers="1,2", mode="comparative"), "at least 3 layers"),
    (dict(model="{bad}/bert"), "Model family 'bert' is not supported"),
    (dict(model="{bad}/no_model"), "Model folder not found"),
    (dict(prompt=None), "needs --prompt"),
    (dict(texts="a cat"), "--texts is for CLIP"),
    (dict(n_samples="4"), "Smooth methods only"),
    (dict(answer=" "), "--answer is empty"),
])
def test_bad_input_gets_one_line_exit_2_and_nothing_written(capsys, tmp_path, bad_inputs, change, message):
    folder, good = bad_inputs
    options = {**good, "method": "GradCAM", **change}
    argv = ["explain", "--out", tmp_path / "out"]
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", value.format(bad=folder)]
    code, stdout, stderr = run(capsys, *argv)
    assert code == 2
    assert stderr.startswith(ERROR) and message in stderr and stderr.count("\n") == 1, stderr
    assert os.listdir(tmp_path) == []


def test_unknown_answer_word_exits_2_with_nothing_written(capsys, tmp_path, model_dir, image_dir):
    code, _, stderr = run(capsys, "explain", "--model", model_dir, "--image", image_dir / "b.png", "--prompt", PROMPT,
                          "--answer", "zebra", "--out", tmp_path / "out")
    assert code == 2
    assert stderr.strip().splitlines()[-1].startswith(ERROR + "The tokenizer does not know part of the answer 'zebra'")
    assert os.listdir(tmp_path) == []


def test_explain_answer_scores_and_maps_the_teacher_forced_answer(capsys, tmp_path, model_dir, image_dir, wrapper):
    out = tmp_path / "out"
    image = image_dir / "b.png"
    code, _, _ = run(capsys, "explain", "--model", model_dir, "--image", image, "--prompt", PROMPT,
                     "--answer", "red circle", "--method", "GradCAM", "--layers", "1", "--out", out)
    assert code == 0
    row = json.loads((out / "report.json").read_text())[0]
    answered = QwenVLWrapper(wrapper.model, wrapper.processor, prompt=PROMPT, answer="red circle")
    x = answered.preprocess(str(image))
    with torch.no_grad():
        score = float(answered(x)[0, 0])
    with GradCAM(model=answered, target_layers=[answered.decoder_layers[1]],
                 reshape_transform=answered.reshape_transform) as cam:
        expected = cam(x, targets=None)
    assert "predicted_token" not in row and "probability" not in row  # the given answer is no prediction
    assert row["answer"] == "red circle" and row["answer_probability"] == pytest.approx(np.exp(score), abs=1e-6)
    np.testing.assert_allclose(np.load(out / row["files"][1]), expected, atol=1e-5)


def test_explain_per_token_writes_one_map_per_answer_token(capsys, tmp_path, model_dir, image_dir, wrapper):
    from pytorch_grad_cam_vlm.methods.answers import explain_generated

    out = tmp_path / "out"
    image = image_dir / "a.jpg"
    code, _, _ = run(capsys, "explain", "--model", model_dir, "--image", image, "--prompt", PROMPT, "--per-token",
                     "--answer", "a red circle", "--method", "GradCAM", "--layers", "2", "--out", out)
    assert code == 0
    row = json.loads((out / "report.json").read_text())[0]
    assert row["tokens"] == ["a", "red", "circle"] and row["mode"] == "per-token" and row["layers"] == [2]
    expected = explain_generated(wrapper, wrapper.preprocess(str(image)), [wrapper.decoder_layers[2]],
                                 answer="a red circle")
    maps = np.load(out / row["files"][1])
    assert maps.shape == (3, 84, 56)
    np.testing.assert_allclose(maps, expected.maps, atol=1e-5)
    assert Image.open(out / row["files"][0]).size[0] > 0


def test_a_failure_mid_batch_leaves_nothing(capsys, tmp_path, monkeypatch, model_dir, image_dir):
    calls, render = [], common.render

    def render_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return render(*args, **kwargs)

    monkeypatch.setattr(common, "render", render_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["explain", "--model", model_dir, "--image", str(image_dir), "--prompt", PROMPT, "--layers", "1",
              "--out", str(tmp_path / "out")])
    assert len(calls) == 2  # the first image's files had been written, into the staging folder
    assert os.listdir(tmp_path) == []


def test_python_dash_m_runs_the_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytorch_grad_cam_vlm", "explain", "--model", "unused",
                             "--image", "unused.png", "--prompt", PROMPT, "--method", "NoSuchCAM", "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith(ERROR + "Unknown method 'NoSuchCAM': use one of ")
    assert "SmoothGradCAM" in result.stderr and "GradCAMPlusPlus" in result.stderr
    assert os.listdir(tmp_path) == []


def test_explain_clip_model_with_texts(capsys, tmp_path, image_dir):
    from pytorch_grad_cam_vlm.models.clip import CLIPWrapper
    from pytorch_grad_cam_vlm.models.tiny.clip import build_tiny_clip

    model_dir = tmp_path / "clip"
    model, processor = build_tiny_clip(model_dir, family="clip", seed=0)
    texts = ["a red circle", "a blue square", "a photo of a cat"]
    out = tmp_path / "out"
    code, _, _ = run(capsys, "explain", "--model", model_dir, "--image", image_dir / "b.png", "--texts", *texts,
                     "--layers", "all", "--mode", "multi", "--out", out)
    assert code == 0
    [row] = json.loads((out / "report.json").read_text())
    clip = CLIPWrapper(model, processor, texts=texts)
    x = clip.preprocess(str(image_dir / "b.png"))
    with torch.no_grad():
        probabilities = clip(x)[0].softmax(-1)
    assert row["predicted_token"] == texts[int(probabilities.argmax())]
    assert row["probability"] == pytest.approx(float(probabilities.max()), abs=1e-6)
    n_layers = len(clip.vision_layers)
    drawn = list(range(n_layers - 1))  # CLIP pools its class token: the last layer is blank
    assert row["layers"] in (drawn, drawn + ["input"])  # and the occlusion fallback's map where it was kept
    assert (row["layers"][-1] == "input") == (row["method"] == "Occlusion")
    # Saved on the 56x84 image, the columns outside CLIP's center crop NaN (not seen), as the frame says.
    saved = np.load(out / row["files"][1])
    frame = clip.image_frame((56, 84), tuple(x.shape[2:]))
    assert saved.shape == (len(row["layers"]), 56, 84) and frame.input_size == tuple(x.shape[2:])
    assert (np.isnan(saved) == ~frame.seen).all() and np.isnan(saved[:, :, 0]).all() and not frame.seen.all()
    code, _, stderr = run(capsys, "explain", "--model", model_dir, "--image", image_dir / "b.png",
                          "--prompt", PROMPT, "--out", tmp_path / "out2")
    assert code == 2 and "needs --texts" in stderr
    code, _, stderr = run(capsys, "explain", "--model", model_dir, "--image", image_dir / "b.png", "--texts", *texts,
                          "--layers", "projector", "--out", tmp_path / "out3")
    assert code == 2 and "names the projector, which this model or command does not offer" in stderr


def test_explain_at_the_projector_draws_the_mergers_map(capsys, tmp_path, model_dir, image_dir, wrapper):
    out = tmp_path / "out"
    image = image_dir / "a.jpg"
    code, stdout, _ = run(capsys, "explain", "--model", model_dir, "--image", image, "--prompt", PROMPT,
                          "--method", "GradCAM", "--layers", "projector", "--out", out)
    assert code == 0 and "with GradCAM at projector;" in stdout
    [row] = json.loads((out / "report.json").read_text())
    assert row["layers"] == ["projector"]
    assert row["files"] == ["a_GradCAM_single.png", "a_GradCAM_maps.npy", "a_GradCAM_projector_overlay.png"]
    _, _, maps = reference(wrapper, str(image), layers=["projector"])
    np.testing.assert_allclose(np.load(out / row["files"][1]), maps, atol=1e-5)


def test_demo_writes_figures_and_localization_table(capsys, tmp_path):
    from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples

    out = tmp_path / "demo"
    code, stdout, _ = run(capsys, "demo", "--out", out, "--n", 2, "--figures", 1)
    assert code == 0
    assert str(out / "localization_table.md") in stdout
    [single, grid] = json.loads((out / "report.json").read_text())
    sample = make_demo_samples(2, seed=0, split="test")[0]
    demo_wrapper = QwenVLWrapper(*load_demo_model(), prompt=sample.prompt)
    assert single["prompt"] == grid["prompt"] == sample.prompt
    x = demo_wrapper.preprocess(sample.image)
    chosen = explain(demo_wrapper, x)  # method and layer chosen by the deletion check, as the CLI's default
    assert (single["method"], single["layers"]) == (chosen.methods[0], chosen.layers)
    np.testing.assert_allclose(np.load(out / single["files"][1])[0], chosen.maps[0], atol=1e-5)
    # The grid draws every decoder layer ("all"), the candidates but the projector.
    assert grid["method"] == chosen.methods[0] and grid["layers"] == chosen.candidate_layers[1:] == [0, 1, 2]
    assert "auto →" not in single["files"][0] and single["files"][0] == "sample0_auto_single.png"
    with torch.no_grad():
        assert single["predicted_token"] == demo_wrapper.processor.tokenizer.decode([int(demo_wrapper(x).argmax())])
    for row in (single, grid):
        assert all((out / name).is_file() for name in row["files"])
    with open(out / "localization_table.csv") as f:
        table = list(csv.DictReader(f))
    assert {"Occlusion", "GradCAM"} <= {r["method"] for r in table}
    assert all(r["n"] == "2" for r in table)


@pytest.mark.parametrize("mode", ["single", "grid"])
def test_a_chosen_occlusion_fallback_is_drawn_and_reported(capsys, tmp_path, monkeypatch, model_dir, image_dir,
                                                           wrapper, mode):
    """Every gradient candidate blank: explain keeps the occlusion fallback's map (here a stand-in of known values,
    hot on the top-left token cell, with a passing check); single mode draws it, grid mode draws the candidates'
    layers and it beside them, and the report names it as method Occlusion at layer input."""
    from pytorch_grad_cam import GradCAMElementWise, GradCAMPlusPlus

    from pytorch_grad_cam_vlm.methods import auto
    from pytorch_grad_cam_vlm.metrics import reliance
    from pytorch_grad_cam_vlm.metrics.map_check import MapCheck

    monkeypatch.setattr(reliance, "RELIANCE_THRESHOLD", 0.01)  # the random model's 4 % counts as relying on the image

    monkeypatch.setattr(GradCAMPlusPlus, "get_cam_weights", lambda self, *args, **kwargs: np.zeros(args[-1].shape[:2]))
    monkeypatch.setattr(GradCAMElementWise, "get_cam_image", lambda self, *args, **kwargs: np.zeros(
        (args[0].shape[0], *args[0].shape[2:])))
    known = np.zeros((84, 56), np.float32)
    known[:28, :28] = 1
    passing = MapCheck(0.8, [1.0], [1.9], False, 0.4, null_margin=3.0, clean=2.0)
    calls = []
    monkeypatch.setattr(auto, "occlusion_fallback", lambda *args, **kwargs: calls.append(args[3]) or (known, passing))
    image = os.path.join(image_dir, "a.jpg")  # 84 x 56: the model's input as it is
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", image, "--prompt", PROMPT, "--mode", mode,
                       "--out", tmp_path / "out")
    assert code == 0 and len(calls) == 1 and calls[0].blank  # asked once, with the failed check
    [row] = json.loads((tmp_path / "out" / "report.json").read_text())
    layers = ["input"] if mode == "single" else ["projector", 0, 1, 2, "input"]
    assert (row["method"], row["layers"]) == ("Occlusion", layers)
    assert row["layer_methods"] == ["GradCAMPlusPlus"] * (len(layers) - 1) + ["Occlusion"]  # all blank: the first
    assert row["verdict"] == ["blank"] * (len(layers) - 1) + ["ok"] and row["check"][-1] == 0.8
    assert row["files"][1:] == ["a_auto_maps.npy", "a_auto_input_overlay.png"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / row["files"][1])[-1], known)
    # the kept map passes; the gradient map it replaced (the first when all are blank) says why, in both modes
    assert "a.jpg: GradCAMPlusPlus at projector is blank (the map is flat: it shows nothing)." in err
    assert "Occlusion at input" not in err and "occlusion fallback" not in err


def test_a_failed_occlusion_fallback_is_said(capsys, tmp_path, monkeypatch, model_dir, image_dir):
    """Every gradient candidate blank and the occlusion fallback (a stand-in) no better than chance: the blank map
    is drawn, and a warning line says that occlusion at token resolution was tried and failed too, in the report as
    on stderr."""
    from pytorch_grad_cam import GradCAMElementWise, GradCAMPlusPlus

    from pytorch_grad_cam_vlm.methods import auto
    from pytorch_grad_cam_vlm.metrics import reliance
    from pytorch_grad_cam_vlm.metrics.map_check import MapCheck

    monkeypatch.setattr(reliance, "RELIANCE_THRESHOLD", 0.01)  # the random model's 4 % counts as relying on the image
    monkeypatch.setattr(GradCAMPlusPlus, "get_cam_weights", lambda self, *args, **kwargs: np.zeros(args[-1].shape[:2]))
    monkeypatch.setattr(GradCAMElementWise, "get_cam_image", lambda self, *args, **kwargs: np.zeros(
        (args[0].shape[0], *args[0].shape[2:])))
    at_chance = MapCheck(0.01, [1.0], [1.01], False, 0.0, null_margin=0.5, clean=2.0)
    monkeypatch.setattr(auto, "occlusion_fallback", lambda *args, **kwargs: (np.zeros((84, 56), np.float32), at_chance))
    image = os.path.join(image_dir, "a.jpg")
    code, _, err = run(capsys, "explain", "--model", model_dir, "--image", image, "--prompt", PROMPT,
                       "--out", tmp_path / "out")
    [row] = json.loads((tmp_path / "out" / "report.json").read_text())
    tried = (f"{image}: the occlusion fallback (Occlusion at token resolution) tried in its place does not beat chance "
             "(its check total is 0.5 spreads above the mean of random token maps' on this image, below 1.5).")
    assert code == 0 and (row["method"], row["verdict"]) == ("GradCAMPlusPlus", ["blank"])
    assert f"warning: {tried}" in err and tried in row["warning"]
