"""What the tiled families (Gemma 3, InternVL, SmolVLM / Idefics3) share with the others beyond their own adapter
tests: per-token explanations of a generated answer, and the benchmark's boxes on their canvases."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import DEVICES, PROMPT, model_state
from test_llava import shapes_image
from pytorch_grad_cam_vlm import build_tiny_gemma3, build_tiny_idefics3, build_tiny_internvl, explain_generated
from pytorch_grad_cam_vlm.models.answer_text import vision_token_ids
from pytorch_grad_cam_vlm.models.registry import load_model, make_subject, model_config

BUILDERS = {"gemma3": lambda path: build_tiny_gemma3(path, seed=1), "internvl": build_tiny_internvl,
            "smolvlm": lambda path: build_tiny_idefics3(path, family="smolvlm")}
# The wrapper builds the thumbnail / global image from its canvas, the processor from the picture: their next-token
# probabilities differ by this much at most on pictures of shapes (the adapters' tests bound the logits at 1e-3).
PROBABILITY_BOUND = 2e-3


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request, tmp_path_factory):
    """(family, folder, wrapper) of a tiny random model saved, loaded back through the registry, and wrapped as the
    CLI wraps it."""
    folder = str(tmp_path_factory.mktemp(f"tiled_{request.param}"))
    BUILDERS[request.param](folder)
    _, family = model_config(folder)
    model, processor = load_model(folder, family, torch.float32, torch.device("cpu"))
    return family, folder, make_subject(family, model, processor, PROMPT, None).wrapper


def processor_inputs(wrapper, image, answer_ids=()):
    """The processor on the wrapper's chat text and the picture, with answer token ids appended by hand."""
    options = getattr(wrapper, "processor_kwargs", {})
    inputs = dict(wrapper.processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt", **options))
    if len(answer_ids):
        ids = torch.tensor([list(answer_ids)])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], 1)
        for key in ("attention_mask", "token_type_ids", "mm_token_type_ids"):
            if key in inputs:
                fill = torch.ones_like(ids) if key == "attention_mask" else torch.zeros_like(ids)
                inputs[key] = torch.cat([inputs[key], fill], 1)
    return inputs


def test_per_token_maps_follow_the_processor_path(tiny):
    """explain_generated: the generated tokens are the processor path's greedy ones (image tokens suppressed), each token's probability is the
    processor path's with the tokens before it appended, and the first token's map is GradCAM of its logit."""
    family, _, wrapper = tiny
    image = Image.fromarray(shapes_image(60, 90, seed=3))
    x = wrapper.preprocess(image)
    layer = wrapper.decoder_layers[1]
    before = model_state(wrapper.model)
    result = explain_generated(wrapper, x, [layer], max_new_tokens=3, generate_kwargs=dict(min_new_tokens=3))
    assert model_state(wrapper.model) == before and wrapper.answer is None
    with torch.no_grad():
        inputs = processor_inputs(wrapper, image)
        expected = wrapper.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                          suppress_tokens=vision_token_ids(wrapper.processor.tokenizer))
    assert result.token_ids == expected[0, inputs["input_ids"].shape[1]:].tolist()
    assert result.maps.shape == (3,) + tuple(x.shape[2:]) and result.combined.shape == tuple(x.shape[2:])
    for t, token in enumerate(result.token_ids):
        with torch.no_grad():
            logits = wrapper.model(**processor_inputs(wrapper, image, result.token_ids[:t])).logits[0, -1]
        assert result.probabilities[t] == pytest.approx(float(logits.softmax(-1)[token]), abs=PROBABILITY_BOUND)
    with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform) as cam:
        first = cam(input_tensor=x, targets=[ClassifierOutputTarget(result.token_ids[0])])[0]
    np.testing.assert_allclose(result.maps[0], first, atol=1e-5)
    assert result.maps[0].max() > result.maps[0].min()


def test_benchmark_boxes_land_on_the_canvas(tiny, tmp_path):
    """A box over the whole picture holds all of every map's energy (its pointing hit), whatever canvas the
    processor makes of the picture; a box over its left half holds part of it."""
    from pytorch_grad_cam_vlm import cli

    family, folder, _ = tiny
    Image.fromarray(shapes_image(70, 100, seed=5)).save(tmp_path / "im0.png")
    with open(tmp_path / "data.jsonl", "w") as f:
        f.write(json.dumps(dict(image="im0.png", prompt=PROMPT, boxes=[[0, 0, 100, 70]])) + "\n")
        f.write(json.dumps(dict(image="im0.png", prompt=PROMPT, boxes=[[0, 0, 50, 70]],
                                distractor_boxes=[[50, 0, 100, 70]])) + "\n")
    out = str(tmp_path / "bench")
    assert cli.main(["benchmark", "--model", folder, "--data", str(tmp_path / "data.jsonl"), "--out", out,
                     "--layers", "1", "--methods", "GradCAM", "--percentiles", "10,60"]) == 0
    with open(os.path.join(out, "per_sample.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row["method"] == "GradCAM"]
    whole, half = sorted(rows, key=lambda row: int(row["sample"]))
    assert whole["pointing"] == "1" and float(whole["energy"]) == pytest.approx(1.0, abs=1e-6)
    assert 0 < float(half["energy"]) < 1
    assert whole["sanity"] != "" and whole["deletion_auc"] != ""


@pytest.mark.parametrize("device", DEVICES[1:], indirect=True)
def test_logits_and_maps_on_cuda_equal_the_cpu(tiny, device, to_device):
    """The same canvas on CUDA (a copy of the model there): next-token logits and the default view's GradCAM map at
    decoder layer 1 equal the CPU's to 1e-4 (float32, TF32 off). Skipped without CUDA."""
    family, _, wrapper = tiny
    x = wrapper.preprocess(Image.fromarray(shapes_image(60, 90, seed=3)))
    on_device = make_subject(family, to_device(wrapper.model, device), wrapper.processor, PROMPT, None).wrapper
    results = []
    for w, images in ((wrapper, x), (on_device, x.to(device))):
        with torch.no_grad():
            logits = w(images)[0].float().cpu()
        with GradCAM(model=w, target_layers=[w.decoder_layers[1]], reshape_transform=w.reshape_transform) as cam:
            results.append((logits, cam(input_tensor=images, targets=[ClassifierOutputTarget(int(logits.argmax()))])))
    (cpu_logits, cpu_map), (cuda_logits, cuda_map) = results
    torch.testing.assert_close(cuda_logits, cpu_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(cuda_map, cpu_map, atol=1e-4)
