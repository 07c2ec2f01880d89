"""The development models of issue 26 (docs/development_models.md): pairs (Qwen2.5-VL, an answer that compares two
objects: their shared shape, or "no"), onevision (LLaVA-OneVision on a letterboxed 2x3-tile canvas) and internvl
(InternVL on a portrait 3x2-tile canvas with its thumbnail). Their tasks' geometry, and their held-out accuracy and
occlusion reference on 40 samples (seed 1), and the default explain's pointing there, pinned at the measured values
minus a small margin."""
import os

import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import explain, occlusion_map, pointing_hit
from pytorch_grad_cam_vlm.benchmark.localization import answer_accuracy
from pytorch_grad_cam_vlm.demo import COLORS, EMBEDDED_MODELS, SHAPES, embedded_model_path
from pytorch_grad_cam_vlm.demo import pairs, tiled
from pytorch_grad_cam_vlm.models.registry import make_subject

# name -> (loader, held-out samples, occlusion window on the model's input, pointing tolerance on the picture) of the
# shipped models (see docs/development_models.md)
MODELS = {"onevision": (tiled.load_onevision_model, tiled.make_onevision_samples, tiled.OCCLUSION_WINDOW,
                        tiled.TOLERANCE),
          "internvl": (tiled.load_internvl_model, tiled.make_internvl_samples, tiled.OCCLUSION_WINDOW,
                       tiled.TOLERANCE),
          "pairs": (pairs.load_pairs_model, pairs.make_pairs_samples, pairs.CELL, pairs.CELL // 2)}
# Measured on 40 held-out samples (seed 1) by the tests below (accuracy, occlusion's pointing, the default's pointing
# and distractor rate: 1.000, 1.000, 1.000, 0.000 on each model; its maps flagged: 0 of 40 on each, pairs 7 of 40
# without the occlusion fallback), pinned 2 samples lower. The default on 100 samples of seed 1 and 200 of seed 0:
# benchmarks/auto_five_models.md.
PINNED = {name: dict(accuracy=0.95, occlusion=0.95, default=0.95, distractor=0.05, flagged=0.05)
          for name in ("onevision", "internvl", "pairs")}


@pytest.fixture(scope="module", params=sorted(MODELS))
def dev_model(request):
    name = request.param
    load, make, window, tolerance = MODELS[name]
    model, processor = load()
    samples = make(40, seed=1, split="test")
    wrapper = make_subject(model.config.model_type, model, processor, samples[0].prompt, None).wrapper
    return name, wrapper, samples, window, tolerance


def test_the_names_resolve_and_the_weights_stay_small():
    for name in MODELS:  # the shipped ones
        folder = embedded_model_path(name)
        assert folder == EMBEDDED_MODELS[name] and os.path.isfile(os.path.join(folder, "model.safetensors"))
        assert sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) < 6 * 2 ** 20


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_name_loads_as_the_cli_loads_it_and_answers(name):
    """``--model NAME``'s path: the family read from the embedded folder's config, the model loaded by the
    registry, wrapped for its prompt; it answers three held-out samples."""
    from pytorch_grad_cam_vlm.models.registry import load_model, model_config

    _, make, _, _ = MODELS[name]
    path = embedded_model_path(name)
    _, family = model_config(path)
    model, processor = load_model(path, family, torch.float32, torch.device("cpu"))
    samples = make(3, seed=1, split="test")
    wrapper = make_subject(family, model, processor, samples[0].prompt, None).wrapper
    assert answer_accuracy(wrapper, samples) == 1.0


def test_the_colors_model_loads_by_name_and_answers_about_every_colour():
    """The colors model (the demo task asked about any colour; prompt words' test model): its name resolves to a
    small folder the CLI loads, its samples ask about every colour with the asked object first among the boxes, and
    it answers 40 held-out samples at the accuracy measured on 200 (0.970), pinned at 0.95."""
    from pytorch_grad_cam_vlm.demo import load_colors_model, make_colors_samples
    from pytorch_grad_cam_vlm.models.registry import model_config

    folder = embedded_model_path("colors")
    assert folder == EMBEDDED_MODELS["colors"] and model_config(folder)[1] == "qwen2_5_vl"
    assert sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) < 6 * 2 ** 20
    samples = make_colors_samples(40, seed=1)
    assert {s.prompt.split()[4] for s in samples} == set(COLORS)
    model, processor = load_colors_model()
    assert answer_accuracy(make_subject("qwen2_5_vl", model, processor, samples[0].prompt, None).wrapper,
                           samples) >= 0.95


def test_pairs_samples_hold_a_red_and_a_blue_object_and_balance_the_answers():
    samples = pairs.make_pairs_samples(1000, seed=0)
    assert {s.answer for s in samples} == set(pairs.ANSWERS)  # the shared shape, or "no"
    assert 0.45 < np.mean([s.answer == pairs.DIFFERENT for s in samples]) < 0.55
    for sample in samples[:20]:
        assert sample.image.shape == (pairs.CANVAS_HEIGHT, pairs.CANVAS_WIDTH, 3) and sample.prompt == pairs.PROMPT
        assert len(sample.evidence_boxes) == 2 and sample.evidence_box == sample.evidence_boxes[0]
        for box, color in zip(sample.evidence_boxes, (pairs.FIRST, pairs.SECOND)):
            x0, y0, x1, y1 = box  # every shape covers the centre of its box
            centre = sample.image[(y0 + y1) // 2 - 1:(y0 + y1) // 2 + 2, (x0 + x1) // 2 - 1:(x0 + x1) // 2 + 2]
            assert np.abs(centre.reshape(-1, 3).mean(0) - COLORS[color]).max() < 25
    a, b = pairs.make_pairs_samples(3, seed=5), pairs.make_pairs_samples(3, seed=5, split="train")
    assert not any(np.array_equal(x.image, y.image) for x, y in zip(a, b))


def test_the_onevision_canvas_is_letterboxed_2x3_tiles(dev_model):
    """OneVision letterboxes the 48x96 picture into 64x96 (2x3 tiles, 8-px bars); the frame puts it back."""
    name, wrapper, samples, _, _ = dev_model
    if name != "onevision":
        pytest.skip("only OneVision letterboxes its picture")
    x = wrapper.preprocess(samples[0].image)
    assert tuple(x.shape[2:]) == (64, 96) and wrapper.layout_for(64, 96).tiles == (2, 3)
    assert torch.all(x[0, :, :8] == -1) and torch.all(x[0, :, 56:] == -1)  # the bars: black, normalised
    assert not torch.all(x[0, :, 8:56] == -1)
    frame = wrapper.image_frame(samples[0].image.shape[:2], tuple(x.shape[2:]))
    on_canvas = np.zeros((64, 96))
    on_canvas[8:24, 16:32] = 1  # one cell of the picture, 8 px down on the canvas
    on_picture = frame.to_image(on_canvas)
    assert on_picture.shape == (48, 96) and on_picture[:16, 16:32].min() > 0.99 and on_picture[20:].max() == 0


def test_the_internvl_task_tiles_its_portrait_picture_3x2_with_a_thumbnail():
    """The internvl task's 96x64 picture on a tiny InternVL with the recipe's processor: 3x2 tiles and the
    thumbnail, 7 images of 16 tokens."""
    from pytorch_grad_cam_vlm import build_tiny_internvl

    model, processor = build_tiny_internvl(words=tiled.INTERNVL_WORDS, text_layers=1, vision_layers=1)
    sample = tiled.make_internvl_samples(1)[0]
    wrapper = make_subject(model.config.model_type, model, processor, sample.prompt, None).wrapper
    x = wrapper.preprocess(sample.image)
    layout = wrapper.layout_for(96, 64)
    assert tuple(x.shape[2:]) == (96, 64) and layout.tiles == (3, 2) and layout.thumbnail
    assert len(layout.image_positions) == 7 * 16 and sample.answer in SHAPES and len(sample.distractor_boxes) == 3


def test_held_out_accuracy(dev_model):
    name, wrapper, samples, _, _ = dev_model
    accuracy = answer_accuracy(wrapper, samples)
    print(f"{name} accuracy {accuracy:.3f}")
    assert accuracy >= PINNED[name]["accuracy"]


def test_occlusion_points_at_the_evidence(dev_model):
    """Occlusion's maximum, carried onto the picture, on the evidence (pairs: either object)."""
    name, wrapper, samples, window, tolerance = dev_model
    token_id = wrapper.processor.tokenizer.convert_tokens_to_ids
    hits = 0
    for sample in samples:
        x = wrapper.preprocess(sample.image)
        cam = wrapper.image_frame(sample.image.shape[:2], tuple(x.shape[2:])).to_image(
            occlusion_map(wrapper, x, token_id(sample.answer), window=window))
        boxes = getattr(sample, "evidence_boxes", None) or [sample.evidence_box]
        hits += any(pointing_hit(cam, box, tolerance) for box in boxes)
    print(f"{name} occlusion pointing {hits / len(samples):.3f}")
    assert hits / len(samples) >= PINNED[name]["occlusion"]


def test_the_default_points_at_the_evidence(dev_model):
    """explain's default (auto) with the answer as target, its map on the picture: the maximum on the evidence
    (pairs: either object) and on a distractor, as benchmarks/dev_models_gap.py scores it; and the share of its maps
    of answers that depend on the image that are not "ok" (issue 26's goal: at most 5 %; benchmarks/verdict_null.md
    on 200 samples: pairs 0.025 with the occlusion fallback, 0.185 without)."""
    name, wrapper, samples, _, tolerance = dev_model
    token_id = wrapper.processor.tokenizer.convert_tokens_to_ids
    hits = distractors = flagged = reliant = 0
    for sample in samples:
        result = explain(wrapper, sample.image, [ClassifierOutputTarget(token_id(sample.answer))])
        cam = result.maps[0]
        boxes = getattr(sample, "evidence_boxes", None) or [sample.evidence_box]
        hits += any(pointing_hit(cam, box, tolerance) for box in boxes)
        distractors += any(pointing_hit(cam, box, tolerance) for box in sample.distractor_boxes)
        reliant += not result.reliance[0].prompt_only
        flagged += result.checks[0].failed and not result.reliance[0].prompt_only
    print(f"{name} default pointing {hits / len(samples):.3f} distractor {distractors / len(samples):.3f} flagged "
          f"{flagged} of {reliant}")
    assert flagged / reliant <= PINNED[name]["flagged"]
    assert hits / len(samples) >= PINNED[name]["default"]
    assert distractors / len(samples) <= PINNED[name]["distractor"]


def test_the_defaults_map_of_a_shared_shape_that_ranks_the_second_object_lowest_is_incomplete():
    """pairs, held-out samples 8 and 18 (seed 0; benchmarks/verdict_null.py flags 25 of 200 such maps): the default's
    map puts its top 5 % on one asked object and its bottom 5 % on the other, so removing either breaks the answer,
    while the null's random token cells mostly do not. The verdict says the map is incomplete, not that the answer
    breaks under any removal. explain then keeps the occlusion fallback's map, which passes and peaks on an asked
    object."""
    from pytorch_grad_cam_vlm.layers import INPUT
    from pytorch_grad_cam_vlm.metrics.deletion_check import map_rng, ranked_map
    from pytorch_grad_cam_vlm.metrics.localization import pointing_hit
    from pytorch_grad_cam_vlm.metrics.map_check import FRAGILE_SHARE

    model, processor = pairs.load_pairs_model()
    samples = pairs.make_pairs_samples(20, seed=0, split="test")
    wrapper = make_subject(model.config.model_type, model, processor, samples[0].prompt, None).wrapper
    token_id = wrapper.processor.tokenizer.convert_tokens_to_ids
    for i in (8, 18):
        sample = samples[i]
        result = explain(wrapper, sample.image, [ClassifierOutputTarget(token_id(sample.answer))])
        m, l = result.candidate_choice(0)  # the gradient map the check ranked best
        check, cam = result.candidate_checks[0][m][l], result.candidate_maps[0, m, l]
        assert check.verdict == "incomplete" and check.null_removal_drop < FRAGILE_SHARE * check.clean
        assert (result.methods[0], result.layers[0], result.checks[0].verdict) == ("Occlusion", INPUT, "ok")
        assert result.checks[0].null_totals == check.null_totals  # judged against the same null
        assert any(pointing_hit(result.maps[0], box, 14) for box in sample.evidence_boxes)
        assert cam.shape == sample.image.shape[:2]  # the model's input is the picture: boxes apply as they are
        ranks = ranked_map(cam, map_rng(0, cam))  # the check's own order (seed 0)
        inside = [ranks[y0:y1, x0:x1] for x0, y0, x1, y1 in (np.round(b).astype(int) for b in sample.evidence_boxes)]
        top = [float((part >= 0.95).mean()) for part in inside]  # each object's share in the top 5 %
        bottom = [float((part < 0.05).mean()) for part in inside]
        assert max(top) > 0.95 and max(bottom) > 0.8 and np.argmax(top) != np.argmax(bottom)
