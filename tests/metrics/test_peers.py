"""The package's metrics against an independent implementation, Quantus 0.6, on the same maps and model: the deletion
curve equals ``PixelFlipping``'s (same canvas, steps and order), the pointing game equals ``PointingGame`` on
non-blank maps (a blank map is a hit for Quantus and a miss here), the energy in a box or mask equals
``RelevanceMassAccuracy``."""

import numpy as np
import pytest

from pytorch_grad_cam_vlm.metrics.auc_protocols import protocol, removal_order
from pytorch_grad_cam_vlm.metrics.localization import energy_in_box, energy_in_mask, pointing_hit, pointing_in_mask
from pytorch_grad_cam_vlm.metrics.perturbation import PerturbationScorer

from conftest import random_image

quantus = pytest.importorskip("quantus")  # in the test extra; skipped only where it is not installed
TOKEN = 5
HEIGHT, WIDTH = 56, 84
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trapz(monkeypatch):
    """Quantus 0.6's AUC calls ``np.trapz``, which numpy 2.4 removed: lend it ``np.trapezoid`` for this test."""
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


@pytest.fixture
def eval_wrapper(wrapper):
    """``wrapper`` in eval mode, as Quantus's model interface demands, its modules' modes restored afterwards."""
    modes = {module: module.training for module in wrapper.modules()}
    wrapper.eval()
    yield wrapper
    for module, training in modes.items():
        module.train(training)


def box_mask(box, shape=(HEIGHT, WIDTH)):
    x0, y0, x1, y1 = box
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_deletion_curve_equals_quantus_pixel_flipping(eval_wrapper, trapz):
    """PixelFlipping sorts the map broadcast over the channels (``np.argsort(-a)`` of C x H x W values) and replaces
    ``features_in_step`` values per step by the baseline: on a map without ties the three channels of a pixel are
    neighbours in that order, so 3 x 196 values per step remove 196 pixels, in the order of the ``first`` tie order.
    Baseline 0.0 is the ``zeros`` canvas; its curve is the softmax probability after each step."""
    wrapper = eval_wrapper
    x = wrapper.preprocess(random_image(HEIGHT, WIDTH, seed=7))
    cam = np.random.default_rng(3).random((HEIGHT, WIDTH)).astype(np.float32)  # no ties
    steps = HEIGHT * WIDTH // 196
    chosen = protocol("eagle", deletion_canvas="zeros", insertion_canvas="zeros", steps=steps)
    ours = PerturbationScorer(wrapper, x, TOKEN, [50], chosen, batch_size=8)(cam, removal_order(cam, "first"))

    metric = quantus.PixelFlipping(features_in_step=3 * 196, perturb_baseline=0.0, normalise=False, abs=False,
                                   disable_warnings=True, return_auc_per_sample=True)
    theirs_auc = metric(model=wrapper, x_batch=x.numpy(), y_batch=np.array([TOKEN]), a_batch=cam[None, None],
                        softmax=True, device="cpu")
    theirs = quantus.PixelFlipping(features_in_step=3 * 196, perturb_baseline=0.0, normalise=False, abs=False,
                                   disable_warnings=True)(model=wrapper, x_batch=x.numpy(), y_batch=np.array([TOKEN]),
                                                          a_batch=cam[None, None], softmax=True, device="cpu")[0]
    assert len(theirs) == steps and len(ours.deletion) == steps + 1
    # Quantus's curve starts after the first step; ours starts at the clean image.
    np.testing.assert_allclose(ours.deletion[1:], theirs, atol=1e-6, rtol=0)
    assert ours.deletion[-1] < 0.5 * ours.deletion[0] or ours.deletion[0] < 0.5  # the curve moves: not a blank test
    # Quantus's AUC is the trapezoid over its own points with unit spacing; ours over clean..canvas on [0, 1].
    assert theirs_auc[0] == pytest.approx(ours.deletion_auc * steps - (ours.deletion[0] + ours.deletion[1]) / 2,
                                          abs=1e-5)


def test_pointing_game_equals_quantus_on_non_blank_maps():
    """PointingGame: a hit where a maximum of the map lies in the mask; on maps with one clear maximum that is the
    package's pointing game with no tolerance, for boxes and for masks. (On a plateau Quantus hits where any of its
    pixels does, the package where the plateau pixel nearest its centre does.)"""
    rng = np.random.default_rng(0)
    maps = rng.random((200, HEIGHT, WIDTH)).astype(np.float32)
    boxes = []
    for _ in maps:
        x0, y0 = int(rng.integers(0, WIDTH - 10)), int(rng.integers(0, HEIGHT - 10))
        boxes.append((x0, y0, x0 + int(rng.integers(5, WIDTH - x0)), y0 + int(rng.integers(5, HEIGHT - y0))))
    masks = rng.random((len(maps), HEIGHT, WIDTH)) < 0.3
    for k, box in enumerate(boxes):  # one clear peak (the package reads a plateau within 1e-6 of the top as one)
        y, x = (box[1], box[0]) if k % 2 else (int(rng.integers(HEIGHT)), int(rng.integers(WIDTH)))
        maps[k, y, x] = 2.0  # odd maps peak in their box's corner, the others anywhere
    metric = quantus.PointingGame(disable_warnings=True)
    s_boxes = np.stack([box_mask(b) for b in boxes])[:, None]
    theirs_box = metric(model=None, x_batch=np.zeros((len(maps), 3, HEIGHT, WIDTH), np.float32),
                        y_batch=np.zeros(len(maps), int), a_batch=maps[:, None], s_batch=s_boxes)
    theirs_mask = metric(model=None, x_batch=np.zeros((len(maps), 3, HEIGHT, WIDTH), np.float32),
                         y_batch=np.zeros(len(maps), int), a_batch=maps[:, None], s_batch=masks[:, None])
    ours_box = [pointing_hit(m, b, tolerance_px=0) for m, b in zip(maps, boxes)]
    ours_mask = [pointing_in_mask(m, s, tolerance_px=0) for m, s in zip(maps, masks)]
    assert [bool(v) for v in theirs_box] == ours_box
    assert [bool(v) for v in theirs_mask] == ours_mask
    assert 0.3 < np.mean(ours_box) < 1 and 0 < np.mean(ours_mask) < 1  # both outcomes occur


def test_quantus_counts_a_blank_map_as_a_hit_the_package_does_not():
    """A blank (all-zero) map has its maximum everywhere: in a batch (Quantus refuses a batch whose maps are all
    blank, not one blank map among others) Quantus's PointingGame calls it a hit on any non-empty mask; the package's
    pointing game says it points nowhere (a miss), as a map that shows nothing should score."""
    maps = np.zeros((2, 1, HEIGHT, WIDTH), np.float32)
    maps[1, 0, 40, 70] = 1.0  # a map that points outside the box
    box = (10, 10, 20, 20)
    theirs = quantus.PointingGame(disable_warnings=True)(
        model=None, x_batch=np.zeros((2, 3, HEIGHT, WIDTH), np.float32), y_batch=np.zeros(2, int), a_batch=maps,
        s_batch=np.stack([box_mask(box)] * 2)[:, None])
    assert [bool(v) for v in theirs] == [True, False]
    assert [pointing_hit(m[0], box, tolerance_px=0) for m in maps] == [False, False]
    assert [pointing_in_mask(m[0], box_mask(box), tolerance_px=0) for m in maps] == [False, False]


def test_energy_equals_quantus_relevance_mass_accuracy():
    """RelevanceMassAccuracy: the map's sum inside the mask over its sum; on non-negative maps (the package's maps
    are ReLU'd; it counts positive mass) that is the energy in the box and in the mask."""
    rng = np.random.default_rng(1)
    maps = rng.random((50, HEIGHT, WIDTH)).astype(np.float32) ** 3
    boxes = [(int(a), int(b), int(a) + 20, int(b) + 15) for a, b in zip(rng.integers(0, WIDTH - 20, 50),
                                                                         rng.integers(0, HEIGHT - 15, 50))]
    masks = rng.random((50, HEIGHT, WIDTH)) < 0.2
    metric = quantus.RelevanceMassAccuracy(disable_warnings=True)
    kwargs = dict(model=None, x_batch=np.zeros((50, 3, HEIGHT, WIDTH), np.float32), y_batch=np.zeros(50, int),
                  a_batch=maps[:, None])
    theirs_box = metric(**kwargs, s_batch=np.stack([box_mask(b) for b in boxes])[:, None])
    theirs_mask = metric(**kwargs, s_batch=masks[:, None])
    np.testing.assert_allclose([energy_in_box(m, b) for m, b in zip(maps, boxes)], theirs_box, atol=1e-6, rtol=0)
    np.testing.assert_allclose([energy_in_mask(m, s) for m, s in zip(maps, masks)], theirs_mask, atol=1e-6, rtol=0)
