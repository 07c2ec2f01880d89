"""Visual reliance: equal to a by-hand computation, and a model that answers from its prompt alone is warned of, its
maps "untestable"."""
import numpy as np
import pytest
import torch
from conftest import random_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.layers import layer_name
from pytorch_grad_cam_vlm.methods.auto import explain
from pytorch_grad_cam_vlm.metrics.deletion_check import check_maps, filled
from pytorch_grad_cam_vlm.metrics.null import NULL_MAPS
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
        "+0.0%, removing parts of it by at most 0.0%; blurring it by +0.0%): the answer comes from the prompt, not the "
        "image, and no map of it can be trusted.")
    result = explain(wrapper, x, [ClassifierOutputTarget(2)], method="GradCAM", layers=[0])
    assert not result.reliance[0].prompt_only and result.reliance[0].warning("a.png") is None


def test_no_map_of_an_answer_from_the_prompt_is_ok(wrapper):
    """The projector's output scaled down 100 times: the maps still show structure and the check alone calls two of
    them "ok", but no removal moves the target by 1 % of its value (threshold 5 %), so every candidate's verdict is
    "untestable", with the reason."""
    x = wrapper.preprocess(random_image(56, 84, seed=5))
    target = ClassifierOutputTarget(32)
    handle = wrapper.merger.register_forward_hook(lambda module, args, output: output * 1e-2)
    try:
        result = explain(wrapper, x, [target], method="GradCAM", layers="projector,0,1", choice="full")
        checks = [c for row in result.candidate_checks[0] for c in row if c is not None]
        assert result.reliance[0].prompt_only and not all(c.blank for c in checks)
        assert all(c.prompt_only and c.verdict == ("blank" if c.blank else "untestable") for c in checks)
        assert result.warnings(["a.png"])[0] == (
            f"a.png: GradCAM at {layer_name(result.layers[0])} cannot be checked on this image (the target hardly "
            "depends on the image: see its visual reliance).")
        # the same maps' own check, without the reliance: what the verdict would say of them
        own = check_maps(wrapper, x, result.candidate_maps[0, 0], target, null=NULL_MAPS)
        assert [c.verdict for c in own] == ["chance", "ok", "ok"]  # totals of 0.001-0.003 on a target of -0.36
        assert [c.total for c in own] == pytest.approx([c.total for c in checks], abs=1e-6)
    finally:
        handle.remove()


def test_the_threshold_is_on_the_whole_image_and_not_on_the_blur():
    """The demo model's "triangle" (held-out sample 0 of benchmarks/verdict_null.py): a grey image and every removal
    leave its logit at 8.63, its blur drops it to -0.85 by looking like another shape. The answer is the one the model
    gives with no image: warned of, whatever the blur does."""
    assert VisualReliance(2.0, 2.0 - 0.5 * RELIANCE_THRESHOLD, 2.0).prompt_only
    assert not VisualReliance(2.0, 2.0 - 4 * RELIANCE_THRESHOLD, 2.0).prompt_only
    assert VisualReliance(8.632889, 8.634178, -0.847097, 0.000522).prompt_only
    assert VisualReliance(2.0, 2.0, 2.0 + 4).prompt_only
    assert not VisualReliance(-2.0, -1.0, -2.0).prompt_only  # the target rises without the image: it depends on it
    assert np.isnan(VisualReliance(0.0, 0.0, 0.0).share)


def test_a_default_answer_that_parts_of_the_image_still_move_is_not_warned_of():
    """A model's default answer can survive a blank image (the demo model's "triangle"): when a part the check
    removed moves the target, the image matters and nothing is said."""
    from pytorch_grad_cam_vlm.metrics.map_check import MapCheck
    from pytorch_grad_cam_vlm.metrics.reliance import part_change

    checks = [MapCheck(0.3, [1.4], [1.9], False, 0.25), MapCheck(float("nan"), [], [], True, float("nan"))]
    assert part_change(2.0, checks) == pytest.approx(0.6)  # the top share removed: 2.0 -> 1.4
    assert part_change(2.0, checks[1:]) == 0.0  # blank maps remove nothing
    assert part_change(2.0, [None, *checks]) == pytest.approx(0.6)  # maps a staged or peak choice left unchecked
    assert VisualReliance(2.0, 2.0, 2.0).prompt_only
    assert not VisualReliance(2.0, 2.0, 2.0, part_change(2.0, checks)).prompt_only
    assert VisualReliance(2.0, 2.0, 2.0, 0.5 * RELIANCE_THRESHOLD * 2.0).prompt_only
