"""The deletion check: equal to a by-hand computation, passes a good map, fails its inversion, flags blank maps."""
import numpy as np
import pytest
import torch
from conftest import random_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.metrics.deletion_check import (auto_batch_size, check_maps, filled, first_order_checks,
                                                         map_rng, ranked_map, target_gradient)
from pytorch_grad_cam_vlm.metrics.map_check import MapCheck, failure_warning
from pytorch_grad_cam_vlm.metrics.localization import map_peak

BOX = (8, 4, 20, 14)  # x0, y0, x1, y1 of the region the toy model reads


class RegionScore(torch.nn.Module):
    """Logit 0 = the mean of the image inside BOX, logit 1 = its mean outside: evidence is known."""

    def forward(self, x):
        x0, y0, x1, y1 = BOX
        inside = x[:, :, y0:y1, x0:x1].mean(dim=(1, 2, 3))
        return torch.stack([inside, x.mean(dim=(1, 2, 3))], dim=1)


def region_map(height=24, width=32):
    cam = np.zeros((height, width), dtype=np.float32)
    x0, y0, x1, y1 = BOX
    cam[y0:y1, x0:x1] = 1
    return cam


def test_a_good_map_passes_and_its_inversion_fails():
    x = torch.rand(1, 3, 24, 32) + 1  # positive pixels: removing them (fill 0) lowers the region's mean
    good = region_map() + 0.01 * np.random.RandomState(0).rand(24, 32).astype(np.float32)
    checks = check_maps(RegionScore(), x, np.stack([good, 1 - good]), ClassifierOutputTarget(0))
    assert checks[0].score > 0 and checks[0].verdict == "ok"
    assert checks[1].score < 0 and checks[1].inverted and checks[1].verdict == "inverted"
    assert checks[0].score == pytest.approx(-checks[1].score, rel=0.2)


def test_a_constant_map_is_blank_and_costs_no_pass():
    calls = []

    class Counting(RegionScore):
        def forward(self, x):
            calls.append(len(x))
            return super().forward(x)

    x = torch.rand(1, 3, 24, 32)
    [check] = check_maps(Counting(), x, np.full((1, 24, 32), 0.5, np.float32), ClassifierOutputTarget(0))
    assert check.blank and check.failed and np.isnan(check.score) and calls == []
    assert failure_warning("a.png", "GradCAM at layer 3", check) == \
        "a.png: GradCAM at layer 3 is blank (the map is flat: it shows nothing)."


def test_every_map_of_an_image_goes_through_batched_passes():
    calls = []

    class Counting(RegionScore):
        def forward(self, x):
            calls.append(len(x))
            return super().forward(x)

    maps = np.random.RandomState(1).rand(5, 24, 32).astype(np.float32)
    maps[3] = maps[1]  # the same peak: one image for both
    check_maps(Counting(), torch.rand(1, 3, 24, 32), maps, ClassifierOutputTarget(0), fractions=(0.1, 0.3),
               batch_size=8)
    # the clean image, 5 maps x 2 fractions x (top, bottom), 4 distinct peaks, in batches of 8
    assert calls == [8, 8, 8, 1]
    calls.clear()  # by default as many images as fit in CPU_BATCH_PIXELS, at most 16 (the benchmark's rule)
    check_maps(Counting(), torch.rand(1, 3, 24, 32), maps, ClassifierOutputTarget(0), fractions=(0.1, 0.3))
    assert calls == [16, 9]
    assert [auto_batch_size(torch.zeros(1, 3, s, s)) for s in (112, 224, 448)] == [16, 7, 1]


def test_the_check_equals_a_by_hand_computation(wrapper):
    """On the tiny Qwen model: remove each fraction's top and bottom share (ties in the random order of
    ranked_map, drawn from the seed and the map), fill with 0 and with the blur, and score the target's logit by hand."""
    x = wrapper.preprocess(random_image(56, 84, seed=3))
    maps = np.random.RandomState(2).rand(2, 56, 84).astype(np.float32)
    maps[1] = np.round(maps[1] * 3) / 3  # ties
    target = ClassifierOutputTarget(5)
    for fill in ("mean", "blur"):
        checks = check_maps(wrapper, x, maps, target, fractions=(0.2, 0.5), fill=fill, seed=7, batch_size=3)
        background = torch.zeros_like(x) if fill == "mean" else filled(x, "blur")
        for cam, check in zip(maps, checks):
            ranks = torch.from_numpy(ranked_map(cam, map_rng(7, cam)))
            expected = []
            for f in (0.2, 0.5):
                top = torch.where(ranks >= 1 - f, background, x)
                bottom = torch.where(ranks < f, background, x)
                assert float((ranks >= 1 - f).float().mean()) == pytest.approx(f, abs=1 / cam.size)
                with torch.no_grad():
                    expected.append(float(wrapper(bottom)[0, 5] - wrapper(top)[0, 5]))
            assert check.score == pytest.approx(np.mean(expected), abs=1e-5)
            # The peak window: 28 px centred on the map's maximum (clipped to the image), the same fill.
            column, row = map(int, map_peak(cam))  # a plateau's pixel nearest its centre
            if cam is maps[0]:
                assert (row, column) == np.unravel_index(np.argmax(cam), cam.shape)
            y, x_ = row, column
            window = x.clone()
            window[..., max(0, y - 14):y + 14, max(0, x_ - 14):x_ + 14] = background[..., max(0, y - 14):y + 14,
                                                                                    max(0, x_ - 14):x_ + 14]
            with torch.no_grad():
                drop = float(wrapper(x)[0, 5] - wrapper(window)[0, 5])
            assert check.peak_drop == pytest.approx(drop, abs=1e-5)
            assert check.total == pytest.approx(check.score + drop, abs=1e-5)


def test_the_peak_window_finds_the_evidence_and_is_clipped_at_the_border():
    """The toy model reads BOX: a map peaking inside it loses the target, one peaking in a corner loses nothing
    there (the window clipped to the image)."""
    x = torch.rand(1, 3, 40, 48) + 1
    inside, corner = np.zeros((2, 40, 48), np.float32)
    inside[9, 14] = 1
    corner[0, 47] = 1

    class Reads(torch.nn.Module):
        def forward(self, images):
            return images[:, :, 4:14, 8:20].mean(dim=(1, 2, 3), keepdim=True)

    checks = check_maps(Reads(), x, np.stack([inside, corner]), ClassifierOutputTarget(0), peak_window=6)
    region = x[0, :, 4:14, 8:20]
    window = x[0, :, 6:12, 11:17]  # the 6-pixel square centred on (14, 9)
    assert checks[0].peak_drop == pytest.approx(float(window.sum() / region.numel()), abs=1e-5)
    assert checks[1].peak_drop == pytest.approx(0.0, abs=1e-6)


def test_the_blur_fill_keeps_a_constant_image_and_smooths_an_edge():
    constant = torch.full((1, 3, 20, 20), 0.7)
    assert torch.allclose(filled(constant, "blur"), constant, atol=1e-6)
    edge = torch.zeros(1, 3, 40, 40)
    edge[..., 20:] = 1
    blurred = filled(edge, "blur")
    assert 0.4 < float(blurred[0, 0, 10, 20]) < 0.6 and float(blurred[0, 0, 10, 0]) < 0.05


def test_bad_arguments_say_what_to_pass():
    x = torch.rand(1, 3, 24, 32)
    with pytest.raises(ValueError, match=r"maps \(M, H, W\) of the image's size \(24, 32\)"):
        check_maps(RegionScore(), x, np.zeros((2, 10, 10)), ClassifierOutputTarget(0))
    with pytest.raises(ValueError, match="one image"):
        check_maps(RegionScore(), x.repeat(2, 1, 1, 1), np.zeros((1, 24, 32)), ClassifierOutputTarget(0))
    with pytest.raises(ValueError, match="fractions must be numbers between 0 and 1"):
        check_maps(RegionScore(), x, region_map(), ClassifierOutputTarget(0), fractions=(1.5,))
    with pytest.raises(ValueError, match="fill must be one of"):
        check_maps(RegionScore(), x, region_map(), ClassifierOutputTarget(0), fill="noise")
    with pytest.raises(ValueError, match="peak_window must be a whole number of pixels"):
        check_maps(RegionScore(), x, region_map(), ClassifierOutputTarget(0), peak_window=0)


def test_an_inverted_map_warning_names_the_best_alternative():
    check = MapCheck(-0.25, [1.0], [0.75], False, 0.1)
    assert failure_warning("b.png", "LayerCAM at layer 2", check, "layer 0") == (
        "b.png: LayerCAM at layer 2 is inverted (deletion check -0.25: removing its most relevant pixels hurts the "
        "target less than removing its least relevant); layer 0 ranks best on the check.")
    assert failure_warning("b.png", "LayerCAM at layer 0", MapCheck(0.5, [0.5], [1.0], False, 0.1)) is None


def test_the_first_order_estimate_is_exact_on_a_linear_model():
    """RegionScore is linear in its input: the first-order estimate of each map's check is the check itself."""
    x = torch.rand(1, 3, 24, 32) + 1
    maps = np.random.RandomState(1).rand(3, 24, 32).astype(np.float32)
    maps[2] = np.round(maps[2] * 2) / 2  # ties, broken in the same order by both
    for fill in ("mean", "blur"):
        checks = check_maps(RegionScore(), x, maps, ClassifierOutputTarget(0), fill=fill, peak_window=7, seed=3)
        clean, gradient = target_gradient(RegionScore(), x, ClassifierOutputTarget(0))
        estimates = first_order_checks(x, gradient, clean, maps, fill=fill, peak_window=7, seed=3)
        for check, estimate in zip(checks, estimates):
            assert estimate.estimated and not check.estimated
            assert estimate.score == pytest.approx(check.score, abs=1e-5)
            assert estimate.peak_drop == pytest.approx(check.peak_drop, abs=1e-5)


def test_the_first_order_estimate_equals_a_by_hand_computation(wrapper):
    """On the tiny Qwen model: the input gradient of the target's logit by autograd, times (fill - x), summed over
    each fraction's top and bottom share and over the peak window."""
    x = wrapper.preprocess(random_image(56, 84, seed=3))
    maps = np.random.RandomState(2).rand(2, 56, 84).astype(np.float32)
    target = ClassifierOutputTarget(5)
    leaf = x.clone().requires_grad_(True)
    logit = wrapper(leaf)[0, 5]
    logit.backward()
    clean, gradient = target_gradient(wrapper, x, target)
    assert clean == pytest.approx(float(logit), abs=1e-5)
    np.testing.assert_allclose(gradient.numpy(), leaf.grad.numpy(), atol=1e-6)
    estimates = first_order_checks(x, gradient, clean, maps, fractions=(0.1, 0.3), seed=4)
    change = (-x * leaf.grad).sum(1)[0].detach().numpy()  # the mean fill is 0
    for cam, estimate in zip(maps, estimates):
        ranks = ranked_map(cam, map_rng(4, cam))
        by_hand = np.mean([change[ranks < f].sum() - change[ranks >= 1 - f].sum() for f in (0.1, 0.3)])
        assert estimate.score == pytest.approx(by_hand, abs=1e-5)
        column, row = map(int, map_peak(cam))
        window = change[max(0, row - 14):row + 14, max(0, column - 14):column + 14].sum()
        assert estimate.peak_drop == pytest.approx(-window, abs=1e-5)
