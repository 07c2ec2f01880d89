"""Visual reliance: equal to a by-hand computation, and a model that answers from its prompt alone is warned of."""
import numpy as np
import pytest
import torch
from conftest import random_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.methods.auto import explain
from pytorch_grad_cam_vlm.metrics.deletion_check import filled
from pytorch_grad_cam_vlm.metrics.reliance import RELIANCE_THRESHOLD, VisualReliance, visual_reliance


def test_visual_reliance_equals_a_by_hand_computation(wrapper):
    x = wrapper.preprocess(random_image(56, 84, seed=2))
    reliance = visual_reliance(wrapper, x, ClassifierOutputTarget(4))
    with torch.no_grad():
        clean = float(wrapper(x)[0, 4])
        grey = float(wrapper(torch.zeros_like(x))[0, 4])  # the mean colour is 0 in the normalised input
        blurred = float(wrapper(filled(x, "blur"))[0, 4])
    assert reliance.clean == pytest.approx(clean, abs=1e-5)
    assert reliance.drop == pytest.approx(clean - grey, abs=1e-5)
    assert reliance.blur_drop == pytest.approx(clean - blurred, abs=1e-5)
    assert reliance.share == pytest.approx((clean - grey) / abs(clean), abs=1e-5)
    assert reliance.blur_share == pytest.approx((clean - blurred) / abs(clean), abs=1e-5)
    given = visual_reliance(wrapper, x, ClassifierOutputTarget(4), clean=clean)
    assert given.drop == pytest.approx(reliance.drop, abs=1e-6)


def test_a_model_that_answers_from_the_prompt_alone_is_warned_of(wrapper):
    """The projector's output zeroed: the decoder sees no image, the target does not move, explain says so."""
    x = wrapper.preprocess(random_image(56, 56, seed=3))
    handle = wrapper.merger.register_forward_hook(lambda module, args, output: output * 0)
    try:
        result = explain(wrapper, x, [ClassifierOutputTarget(2)], method="GradCAM", layers=[0])
    finally:
        handle.remove()
    assert result.reliance[0].prompt_only and result.reliance[0].drop == pytest.approx(0, abs=1e-5)
    assert result.warnings(["a.png"])[-1] == (
        "a.png: the target hardly depends on the image (replacing the whole image by its mean colour changes it by "
        "+0.0%, blurring it by +0.0%, removing parts of it by at most 0.0%): the answer comes from the prompt, not the "
        "image, and no map of it can be trusted.")
    result = explain(wrapper, x, [ClassifierOutputTarget(2)], method="GradCAM", layers=[0])
    assert not result.reliance[0].prompt_only and result.reliance[0].warning("a.png") is None


def test_the_threshold_is_on_the_larger_of_both_shares():
    assert VisualReliance(2.0, 2.0, 2.0 - 0.5 * RELIANCE_THRESHOLD).prompt_only
    assert not VisualReliance(2.0, 2.0, 2.0 - 4 * RELIANCE_THRESHOLD).prompt_only
    assert not VisualReliance(-2.0, -1.0, -2.0).prompt_only  # the target rises without the image: it depends on it
    assert np.isnan(VisualReliance(0.0, 0.0, 0.0).share)


def test_a_default_answer_that_parts_of_the_image_still_move_is_not_warned_of():
    """A model's default answer can survive a blank image (the demo model's "triangle"): when a part the check
    removed moves the target, the image matters and nothing is said."""
    from pytorch_grad_cam_vlm.metrics.deletion_check import MapCheck
    from pytorch_grad_cam_vlm.metrics.reliance import part_change

    checks = [MapCheck(0.3, [1.4], [1.9], False, 0.25), MapCheck(float("nan"), [], [], True, float("nan"))]
    assert part_change(2.0, checks) == pytest.approx(0.6)  # the top share removed: 2.0 -> 1.4
    assert part_change(2.0, checks[1:]) == 0.0  # blank maps remove nothing
    assert part_change(2.0, [None, *checks]) == pytest.approx(0.6)  # maps a staged or peak choice left unchecked
    assert VisualReliance(2.0, 2.0, 2.0).prompt_only
    assert not VisualReliance(2.0, 2.0, 2.0, part_change(2.0, checks)).prompt_only
    assert VisualReliance(2.0, 2.0, 2.0, 0.5 * RELIANCE_THRESHOLD * 2.0).prompt_only
