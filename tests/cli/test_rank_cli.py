"""``rank``: the demo task ranked from a folder, files equal to the API's results, the reverse for one image, and bad
input refused with one error line and nothing written."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from pytorch_grad_cam_vlm import QwenVLWrapper, load_demo_model, make_demo_samples
from pytorch_grad_cam_vlm.cli import main
from pytorch_grad_cam_vlm.methods.rank import rank_images

QUESTION = "What shape is the red object?"
CHEAP = ["--method", "GradCAM", "--layers", "projector,1", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    samples = make_demo_samples(6, seed=3)
    for i, sample in enumerate(samples):
        Image.fromarray(sample.image).save(folder / f"{i}_{sample.answer}.png")
    return folder


def test_rank_a_folder_by_an_answer_writes_what_the_api_computes(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["rank", "--model", "demo", "--image", str(folder), "--prompt", QUESTION, "--answer", "circle",
                 "--out", str(out)] + CHEAP) == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["ranking.csv", "ranking.json", "ranking.png", "ranking_maps.npz"]
    rows = json.loads((out / "ranking.json").read_text())
    names = sorted(os.listdir(folder))
    circles = {n for n in names if n.endswith("_circle.png")}
    assert {r["name"] for r in rows[:len(circles)]} == circles and [r["rank"] for r in rows] == [1, 2, 3, 4, 5, 6]
    model, processor = load_demo_model()
    ranking = rank_images(QwenVLWrapper(model, processor, prompt=QUESTION), [str(folder / n) for n in names],
                          question=QUESTION, answer="circle", method="GradCAM", layers="projector,1")
    maps = np.load(out / "ranking_maps.npz")
    for row in rows:
        assert row["score"] == pytest.approx(ranking.scores[row["index"]], abs=1e-6)
        np.testing.assert_allclose(maps[row["map"]], ranking.maps[row["index"]], atol=1e-6)
    assert "best '" in capsys.readouterr().out


def test_several_answers_rank_the_answers_for_one_image(folder, tmp_path, capsys):
    image = sorted(folder.iterdir())[0]
    out = tmp_path / "out"
    assert main(["rank", "--model", "demo", "--image", str(image), "--prompt", QUESTION, "--answer", "circle",
                 "square", "triangle", "--out", str(out)] + CHEAP) == 0, capsys.readouterr().err
    rows = json.loads((out / "ranking.json").read_text())
    assert rows[0]["name"] == image.stem.split("_")[1] and sorted(r["answer"] for r in rows) == [
        "circle", "square", "triangle"]


@pytest.mark.parametrize("extra, message", [
    (["--caption", "a red circle", "--template", "Is it there?"], r"--template: The caption template must hold one "
                                                                   r"\{caption\} placeholder"),
    (["--caption", "a", "b"], "--image must be one file"),
    (["--prompt", QUESTION], "give one of them"),
    (["--caption", "a red circle"], "does not know 'Yes'"),
    (["--caption", "a red circle", "--prompt", QUESTION], "--prompt goes with --answer"),
])
def test_bad_input_one_error_line_and_nothing_written(folder, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["rank", "--model", "demo", "--image", str(folder), "--out", str(out)] + extra + CHEAP) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(err) == 1 and err[0].startswith("pytorch-grad-cam-vlm: error: ")
    assert re.search(message, err[0]), err[0]
    assert not out.exists() and os.listdir(tmp_path) == []


def test_an_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["rank", "--model", "demo", "--image", str(tmp_path / "empty"), "--prompt", QUESTION, "--answer",
                 "circle", "--out", str(tmp_path / "out")] + CHEAP) == 2
    assert "No image files in folder" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_query_image_goes_beside_each_ranked_image(folder, tmp_path, capsys):
    names = sorted(os.listdir(folder))
    out = tmp_path / "out"
    assert main(["rank", "--model", "demo", "--image", str(folder), "--query-image", str(folder / names[0]),
                 "--prompt", QUESTION, "--answer", "circle", "--out", str(out)] + CHEAP) == 0, capsys.readouterr().err
    rows = json.loads((out / "ranking.json").read_text())
    model, processor = load_demo_model()
    ranking = rank_images(QwenVLWrapper(model, processor, prompt=QUESTION), [str(folder / n) for n in names],
                          question=QUESTION, answer="circle", query_image=str(folder / names[0]), method="GradCAM",
                          layers="projector,1")
    for row in rows:
        assert row["score"] == pytest.approx(ranking.scores[row["index"]], abs=1e-6)
    assert np.load(out / "ranking_maps.npz")[rows[0]["map"]].shape == (112, 112)


def test_a_query_image_on_a_one_image_family_is_refused_before_loading(folder, tmp_path, capsys, monkeypatch):
    from pytorch_grad_cam_vlm import build_tiny_mistral3
    from pytorch_grad_cam_vlm.cli import rank as rank_cli

    build_tiny_mistral3(tmp_path / "mistral3", seed=0)
    capsys.readouterr()  # the save's progress bars
    monkeypatch.setattr(rank_cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert main(["rank", "--model", str(tmp_path / "mistral3"), "--image", str(folder), "--query-image",
                 str(folder / sorted(os.listdir(folder))[0]), "--prompt", QUESTION, "--answer", "circle", "--out",
                 str(out)] + CHEAP) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pytorch-grad-cam-vlm: error: --query-image: a mistral3 model takes one image per prompt; several "
                   "images in one prompt work with Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V, InternVL, Idefics3 "
                   "/ SmolVLM, LLaVA 1.5, LLaVA-NeXT, LLaVA-OneVision and Gemma 3 (without pan-and-scan)."]
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["mistral3"]
