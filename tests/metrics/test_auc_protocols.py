"""The deletion / insertion presets against the published procedures written out by hand from their code (RISE's
``CausalMetric.single_run`` with ``gkern(11, 5)``; EAGLE's ``perturbed()`` and its AUC lines), on a fixed map with
ties; the answer change; the bootstrap intervals; the cascading randomisation."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pytorch_grad_cam_vlm.benchmark.intervals import interval, sample_draws, separable
from pytorch_grad_cam_vlm.metrics.answer_change import answer_change
from pytorch_grad_cam_vlm.metrics.auc_protocols import PROTOCOLS, protocol, removal_order
from pytorch_grad_cam_vlm.metrics.perturbation import PerturbationScorer
from pytorch_grad_cam_vlm.metrics.sanity import cascade_modules, cascading_copies

from conftest import random_image

TOKEN = 5
pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_map(shape=(56, 84), seed=4):
    """One value per 14-pixel patch (ties inside each: the tie order matters), a zero (ReLU'd) band."""
    rng = np.random.default_rng(seed)
    cam = np.kron(rng.random((shape[0] // 14, shape[1] // 14)), np.ones((14, 14))).astype(np.float32)
    cam[:, :14] = 0
    return cam


def probability(wrapper, image):
    with torch.no_grad():
        return float(torch.softmax(wrapper(image)[0].float(), -1)[TOKEN])


def test_rise_preset_equals_rise_causal_metric_by_hand(wrapper):
    """RISE: substrate torch.zeros_like (deletion) and conv2d with gkern(11, 5), padding 5 (insertion), on the
    normalised tensor; step = 8 rows of pixels; salient order np.flip(np.argsort(map)) (stable here); RISE's auc."""
    x = wrapper.preprocess(random_image(56, 84, seed=2))
    cam = fixed_map()
    height, width = cam.shape
    hw, step = height * width, 8 * width
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kern = np.zeros((3, 3, 11, 11))
    for c in range(3):
        kern[c, c] = gaussian_filter(delta, 5)
    blur = lambda img: torch.nn.functional.conv2d(img, torch.from_numpy(kern.astype("float32")), padding=5)
    n_steps = (hw + step - 1) // step
    salient_order = np.flip(np.argsort(cam.reshape(-1, hw), axis=1, kind="stable"), axis=-1)
    curves = {}
    for mode, start, finish in (("del", x.clone(), torch.zeros_like(x)), ("ins", blur(x), x.clone())):
        scores = np.empty(n_steps + 1)
        for i in range(n_steps + 1):
            scores[i] = probability(wrapper, start)
            coords = salient_order[:, step * i:step * (i + 1)]
            start.numpy().reshape(1, 3, hw)[0, :, coords] = finish.numpy().reshape(1, 3, hw)[0, :, coords]
        curves[mode] = scores
    rise_auc = lambda arr: (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1)
    chosen = PROTOCOLS["rise"]
    scores = PerturbationScorer(wrapper, x, TOKEN, [50], chosen, batch_size=4)(cam, removal_order(cam, "last"))
    assert n_steps == 7 and chosen.counts(height, width) == [min(k * step, hw) for k in range(8)]
    np.testing.assert_allclose(scores.deletion, curves["del"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(scores.insertion, curves["ins"], atol=1e-6, rtol=0)
    assert scores.deletion_auc == pytest.approx(rise_auc(curves["del"]), abs=1e-6)
    assert scores.insertion_auc == pytest.approx(rise_auc(curves["ins"]), abs=1e-6)
    # The tie order matters on this map: the other direction gives another curve.
    other = PerturbationScorer(wrapper, x, TOKEN, [50], chosen, batch_size=4)(cam, removal_order(cam, "first"))
    assert np.abs(np.array(other.deletion) - curves["del"]).max() > 1e-6


def test_eagle_preset_equals_eagles_perturbed_and_auc_by_hand(wrapper):
    """EAGLE: perturbed() multiplies the uint8 picture by a 0/1 mask of the int(N * i / 64) top pixels of
    np.argsort(-map) (stable here), the processor then normalises it; insertion starts from the all-deleted image and
    deletion from the all-inserted one; AUC by the trapezoid rule over the areas (sklearn.metrics.auc)."""
    image = random_image(56, 84, seed=3)
    x = wrapper.preprocess(image)
    cam = fixed_map(seed=5)
    mean, std = wrapper.image_mean, wrapper.image_std
    flat = cam.flatten()
    index = np.argsort(-flat, kind="stable")

    def perturbed(rate, mode):
        number = int(len(flat) * rate)
        new_mask = np.zeros_like(flat) if mode == "insertion" else np.ones_like(flat)
        new_mask[index[:number]] = 1 if mode == "insertion" else 0
        pixels = image * new_mask.reshape(cam.shape[0], cam.shape[1], 1)
        tensor = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)[None]
        return (tensor - mean) / std

    region_area, insertion_score, deletion_score = [], [], []
    for i in range(1, 65):
        region_area.append(i / 64)
        insertion_score.append(probability(wrapper, perturbed(i / 64, "insertion")))
        deletion_score.append(probability(wrapper, perturbed(i / 64, "deletion")))
    insertion_area = np.array([0] + region_area)
    insertion_curve = np.array([deletion_score[-1]] + insertion_score)
    deletion_curve = np.array([insertion_score[-1]] + deletion_score)
    assert (x - perturbed(1.0, "insertion")).abs().max() < 1e-6  # the processor's normalisation, by hand
    scores = PerturbationScorer(wrapper, x, TOKEN, [50], PROTOCOLS["eagle"], batch_size=8)(
        cam, removal_order(cam, "first"))
    np.testing.assert_allclose(scores.insertion, insertion_curve, atol=1e-6, rtol=0)
    np.testing.assert_allclose(scores.deletion, deletion_curve, atol=1e-6, rtol=0)
    assert scores.insertion_auc == pytest.approx(np.trapezoid(insertion_curve, insertion_area), abs=1e-6)
    assert scores.deletion_auc == pytest.approx(-np.trapezoid(deletion_curve, 1 - insertion_area), abs=1e-6)


def test_protocol_options_and_errors():
    assert protocol("eagle", steps=10).counts(10, 10) == list(range(0, 101, 10))
    assert protocol("rise", deletion_canvas="black").insertion_canvas == "rise-blur"
    assert protocol("rise", ties="random").tie_order == "random"
    with pytest.raises(ValueError, match="protocol must be one of"):
        protocol("lime")
    with pytest.raises(ValueError, match="canvas must be one of"):
        protocol("rise", insertion_canvas="grey")
    assert list(removal_order(np.array([[1.0, 2.0], [2.0, 0.0]]), "first")) == [1, 2, 0, 3]
    assert list(removal_order(np.array([[1.0, 2.0], [2.0, 0.0]]), "last")) == [2, 1, 0, 3]


def test_answer_change_equals_a_loop_by_hand_and_the_benchmarks(wrapper):
    """The first share of the deletion curve whose top answer differs from the clean image's; the top 10 %
    removed; the same numbers as the benchmark's scorer gives."""
    x = wrapper.preprocess(random_image(56, 84, seed=6))
    cam = fixed_map(seed=7)
    chosen = PROTOCOLS["eagle"]
    result = answer_change(wrapper, x, cam, "eagle", batch_size=16)
    order = removal_order(cam, "first")
    black = -wrapper.image_mean / wrapper.image_std
    n = cam.size

    def top(count):
        removed = np.zeros(n, dtype=bool)
        removed[order[:count]] = True
        image = torch.where(torch.from_numpy(removed.reshape(cam.shape)), black, x)
        with torch.no_grad():
            return int(wrapper(image)[0].argmax())

    answer = top(0)
    expected = next((c / n for c in chosen.counts(*cam.shape)[1:] if top(c) != answer), None)
    assert result.share == expected and result.top_share_changed == (top(int(n * 0.1)) != answer)
    scores = PerturbationScorer(wrapper, x, 0, [50], chosen, batch_size=16)(cam, order)
    assert scores.answer_change == expected and scores.top_share_changed == result.top_share_changed


def test_bootstrap_interval_and_separability():
    """Percentile bootstrap of the mean over samples: equal to resampling by hand; NaN values left out."""
    samples = [0, 1, 2, 3, 4]
    values = {0: 0.1, 1: 0.4, 2: 0.35, 3: 0.8, 4: float("nan")}
    draws = sample_draws(samples, 200, seed=1)
    column = np.array([values[s] for s in samples])
    means = [np.nanmean(column[d]) for d in draws if np.isfinite(column[d]).any()]
    assert interval(values, samples, draws) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    a = dict(x=1.0, x_low=0.9, x_high=1.1)
    assert separable(a, dict(x=0.5, x_low=0.4, x_high=0.6), "x") is True
    assert separable(a, dict(x=0.95, x_low=0.8, x_high=0.95), "x") is False
    assert separable(a, dict(x=0.5), "x") is None


def test_cascading_randomisation_goes_from_the_output_down(tiny_qwen, wrapper):
    """Stage k re-initialises lm_head and the first k modules of the cascade (decoder last block first, then the
    merger, then the vision blocks last first); the rest keep their weights, and the model is untouched."""
    model, _ = tiny_qwen
    modules = cascade_modules(wrapper)
    n_decoder = len(wrapper.decoder_layers)
    assert modules[:n_decoder] == wrapper.decoder_layers[::-1] and modules[n_decoder] is wrapper.projector
    assert modules[n_decoder + 1:] == wrapper.vision_blocks[::-1]
    names = {id(m): name for name, m in model.named_modules()}
    before = {name: p.clone() for name, p in model.named_parameters()}
    for k, copy_ in cascading_copies(model, modules, seed=2):
        if k not in (1, n_decoder + 1, len(modules)):
            continue
        randomised = [names[id(m)] for m in modules[:k]]
        for name, parameter in copy_.named_parameters():
            if parameter.dim() < 2:
                continue
            inside = name.startswith("lm_head") or any(name.startswith(r + ".") for r in randomised)
            assert (not torch.equal(parameter, before[name])) == inside, (k, name)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name])
