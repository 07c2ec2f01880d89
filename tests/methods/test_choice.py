"""choose_map(): the staged and peak choices equal the full check on the maps they measure, and explain's forward
images per call are pinned."""
import numpy as np
import pytest
from conftest import random_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.methods import choice
from pytorch_grad_cam_vlm.methods.auto import explain
from pytorch_grad_cam_vlm.methods.choice import STAGED_KEPT, choose_map
from pytorch_grad_cam_vlm.metrics.deletion_check import check_maps
from pytorch_grad_cam_vlm.metrics.null import NULL_MAPS, null_maps
from pytorch_grad_cam_vlm.metrics.localization import map_peak


def token_maps(n, height, width, cell=28, seed=0):
    """Smooth maps like CAMs: random values per token cell, repeated over the cell's pixels."""
    rng = np.random.RandomState(seed)
    grid = rng.rand(n, height // cell, width // cell).astype(np.float32)
    return grid.repeat(cell, axis=1).repeat(cell, axis=2)


def test_the_staged_choice_checks_the_best_partial_totals_in_full(wrapper):
    x = wrapper.preprocess(random_image(56, 84, seed=3))
    maps = token_maps(6, 56, 84)
    maps[4] = 0.5  # blank
    target = ClassifierOutputTarget(5)
    index, checks = choose_map(wrapper, x, maps, target, "staged", seed=2)
    full = check_maps(wrapper, x, maps, target, seed=2)  # a map's tie order does not depend on the others
    first = check_maps(wrapper, x, maps, target, fractions=(0.05,), seed=2)
    partial_totals = np.array([c.total for c in first])
    kept = list(np.argsort(np.where(np.isnan(partial_totals), np.inf, -partial_totals), kind="stable")[:STAGED_KEPT])
    for i, check in enumerate(checks):
        if i in kept:
            assert not check.partial and check.score == pytest.approx(full[i].score, abs=1e-5)
            assert check.peak_drop == pytest.approx(full[i].peak_drop, abs=1e-5)
        elif i == 4:
            assert check.blank and not check.partial
        else:
            assert check.partial and check.total == pytest.approx(first[i].total, abs=1e-5)
            assert check.verdict == "partial" and not check.failed  # half a check judges nothing
    assert [checks[i].verdict for i in kept] == [full[i].verdict for i in kept]
    assert index == kept[int(np.argmax([full[i].total for i in kept]))]


def test_the_full_choice_is_the_argmax_of_every_total_and_peak_the_best_window(wrapper):
    x = wrapper.preprocess(random_image(56, 84, seed=4))
    maps = token_maps(5, 56, 84, seed=1)
    target = ClassifierOutputTarget(7)
    full = check_maps(wrapper, x, maps, target)
    index, checks = choose_map(wrapper, x, maps, target, "full")
    assert index == int(np.argmax([c.total for c in full]))
    assert [c.total for c in checks] == pytest.approx([c.total for c in full], abs=1e-6)
    index, checks = choose_map(wrapper, x, maps, target, "peak")
    assert index == int(np.argmax([c.peak_drop for c in full]))
    assert [i for i, c in enumerate(checks) if c is not None] == [index]
    assert checks[index].total == pytest.approx(full[index].total, abs=1e-5)
    with pytest.raises(ValueError, match="choice must be one of"):
        choose_map(wrapper, x, maps, target, "cheap")


@pytest.mark.parametrize("how, images", [("staged", 56), ("full", 68), ("peak", 40)])  # 28 of them the null's
def test_the_forward_images_per_explain_call_are_pinned(wrapper, how, images):
    """explain() on one 56x84 image of the tiny model: 2 sweep passes (the clean score read from them), the check's
    images, and 2 for the visual reliance. A change that adds passes fails here: update the number only with a measurement that the new
    images pay (benchmarks/auto_cheap.md)."""
    x = wrapper.preprocess(random_image(56, 84, seed=5))
    counted = []
    hook = wrapper.register_forward_pre_hook(lambda module, args: counted.append(len(args[0])))
    try:
        result = explain(wrapper, x, [ClassifierOutputTarget(3)], choice=how)
    finally:
        hook.remove()
    maps = result.candidate_maps[0].reshape(-1, 56, 84)
    shown = [m for m in maps if m.max() - m.min() >= 1e-6]
    nulls = list(null_maps((56, 84), wrapper.token_cell, NULL_MAPS))  # checked in full, their peaks shared
    peaks = len({map_peak(m) for m in shown + nulls}) if how != "peak" else len({map_peak(m) for m in shown})
    null_peaks = len({map_peak(m) for m in nulls} - {map_peak(m) for m in shown}) if how == "peak" else 0
    expected = 2 + 2 + 4 * NULL_MAPS + null_peaks + {"staged": 2 * len(shown) + peaks + 2 * STAGED_KEPT,
                                                     "full": 4 * len(shown) + peaks, "peak": peaks + 4}[how]
    assert sum(counted) == expected == images
    assert counted[:2] == [1, 1]  # the sweep passes, one per method


def test_staged_keeps_the_full_choice_when_it_keeps_every_map(wrapper, monkeypatch):
    x = wrapper.preprocess(random_image(56, 84, seed=6))
    maps = token_maps(4, 56, 84, seed=3)
    target = ClassifierOutputTarget(2)
    monkeypatch.setattr(choice, "STAGED_KEPT", 4)
    staged, checks = choose_map(wrapper, x, maps, target, "staged")
    full, full_checks = choose_map(wrapper, x, maps, target, "full")
    assert staged == full
    assert [c.total for c in checks] == pytest.approx([c.total for c in full_checks], abs=1e-5)


@pytest.mark.parametrize("how", ["staged", "full", "peak"])
def test_every_choice_removes_the_peak_window_it_is_given(wrapper, how):
    """choose_map(peak_window=w) measures each peak drop with a w-pixel window, as check_maps(peak_window=w) does
    (benchmarks/auto_five_models.py compares windows of one and two token cells)."""
    x = wrapper.preprocess(random_image(56, 84, seed=7))
    maps = token_maps(4, 56, 84, seed=5)
    target = ClassifierOutputTarget(4)
    wide = check_maps(wrapper, x, maps, target, peak_window=56)
    default = check_maps(wrapper, x, maps, target)
    assert not np.allclose([c.peak_drop for c in wide], [c.peak_drop for c in default])
    index, checks = choose_map(wrapper, x, maps, target, how, peak_window=56)
    assert checks[index].peak_drop == pytest.approx(wide[index].peak_drop, abs=1e-5)
    if how == "full":
        assert index == int(np.argmax([c.total for c in wide]))


def test_the_first_order_ranking_agrees_with_the_full_check_at_the_measured_rate():
    """Issue 29: the first-order estimate's totals against the full check's, over the default candidates of the first
    12 held-out demo samples: mean Spearman 0.216 (per sample from -0.86 to 0.93; 0.38 over 24 samples, 0.54 over
    100 in benchmarks/auto_cheap.md), pinned within 0.1. Too weak to choose by, which is why no choice uses it."""
    import torch

    from pytorch_grad_cam_vlm import QwenVLWrapper, load_demo_model, make_demo_samples
    from pytorch_grad_cam_vlm.metrics.deletion_check import first_order_checks, target_gradient
    from pytorch_grad_cam_vlm.metrics.sanity import spearman

    model, processor = load_demo_model()
    rhos = []
    for sample in make_demo_samples(12, seed=0):
        wrapper = QwenVLWrapper(model, processor, sample.prompt)
        x = wrapper.preprocess(sample.image)
        target = ClassifierOutputTarget(processor.tokenizer.convert_tokens_to_ids(sample.answer))
        result = explain(wrapper, x, [target], choice="full", null=0)
        maps = result.candidate_maps[0].reshape(-1, *result.candidate_maps.shape[3:])
        measured = np.array([c.total for row in result.candidate_checks[0] for c in row])
        clean, gradient = target_gradient(wrapper, x, target)
        estimated = np.array([c.total for c in first_order_checks(x, gradient, clean, maps)])
        assert clean == pytest.approx(result.reliance[0].clean, abs=1e-4) and torch.isfinite(gradient).all()
        keep = ~(np.isnan(estimated) | np.isnan(measured))  # blank maps have no total
        rhos.append(spearman(estimated[keep], measured[keep]))
    assert np.mean(rhos) == pytest.approx(0.216, abs=0.1)
