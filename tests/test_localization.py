"""Localization measurement: occlusion reference, pointing game, energy in box, and the demo model's pinned table."""
import numpy as np
import pytest
import torch

from pytorch_grad_cam_vlm import QwenVLWrapper
from pytorch_grad_cam_vlm.localization import (AUTO_LAYER_DEPTH, auto_layer, energy_in_box, grad_cam_method,
                                               localization_table, map_peak, occlusion_map, pointing_hit,
                                               table_markdown)


class RegionScore(torch.nn.Module):
    """Logit 1 = the sum of the image inside a known region; occluding that region is what lowers it."""

    def __init__(self, box):
        super().__init__()
        self.box = box

    def forward(self, x):
        x0, y0, x1, y1 = self.box
        score = x[:, :, y0:y1, x0:x1].sum(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_occlusion_map_peaks_on_the_region_the_score_reads():
    box = (56, 28, 84, 56)
    cam = occlusion_map(RegionScore(box), torch.ones(1, 3, 112, 112), target_token_id=1)
    assert cam.shape == (112, 112)
    x, y = map_peak(cam)
    assert 56 <= x < 84 and 28 <= y < 56
    # the window exactly on the region hides all of it: 28*28*3 ones; the pixels there are covered by 4 windows
    # (stride 14) whose mean drop is (2352 + 1176 + 1176 + 588) / 4
    assert cam[40, 70] == pytest.approx((2352 + 1176 + 1176 + 588) / 4)
    assert cam[0, 0] == 0


def test_occlusion_map_refuses_a_batch():
    with pytest.raises(ValueError, match="one image"):
        occlusion_map(RegionScore((0, 0, 28, 28)), torch.ones(2, 3, 56, 56), target_token_id=1)


def test_pointing_hit_tolerance_and_blank_map():
    cam = np.zeros((112, 112))
    cam[30, 50] = 1.0  # x=50, y=30
    assert pointing_hit(cam, (40, 20, 60, 40), tolerance_px=0)
    assert not pointing_hit(cam, (65, 20, 80, 40), tolerance_px=14)  # 50 < 65 - 14
    assert pointing_hit(cam, (65, 20, 80, 40), tolerance_px=15)
    assert not pointing_hit(np.ones((112, 112)), (0, 0, 112, 112), tolerance_px=14)


def test_map_peak_takes_the_centre_of_a_plateau():
    cam = np.zeros((56, 56))
    cam[14:28, 28:42] = 2.0
    assert map_peak(cam) == (34.0, 20.0)  # the first of the four pixels nearest to (34.5, 20.5)


def test_energy_in_box_is_the_share_of_positive_mass():
    cam = np.full((100, 100), 1.0)
    cam[:10, :10] = -5.0  # negative values carry no energy
    assert energy_in_box(cam, (50, 50, 100, 100)) == pytest.approx(2500 / 9900)
    assert energy_in_box(np.zeros((10, 10)), (0, 0, 5, 5)) == 0.0


def test_auto_layer_is_never_the_last(wrapper):
    n = len(wrapper.decoder_layers)
    assert auto_layer(wrapper) == min(n - 2, round(AUTO_LAYER_DEPTH * (n - 1)))
    assert auto_layer(wrapper) < n - 1


def test_localization_table_scores_each_method_and_layer(wrapper):
    from pytorch_grad_cam_vlm.demo import make_demo_samples

    samples = make_demo_samples(4, seed=0)
    order = iter(samples * 2)  # the table visits the samples in order, once per layer

    def oracle(sample_wrapper, layer, x, token_id):
        """Peaks on the evidence box of the first two samples and on a distractor box of the last two."""
        sample = next(order)
        index = [id(s) for s in samples].index(id(sample))
        x0, y0, x1, y1 = sample.evidence_box if index < 2 else sample.distractor_boxes[0]
        assert sample_wrapper.prompt == sample.prompt and x.shape == (1, 3, 112, 112)
        assert token_id == sample_wrapper.processor.tokenizer.convert_tokens_to_ids(sample.answer)
        cam = np.zeros((112, 112))
        cam[y0:y1, x0:x1] = 1.0
        return cam

    rows = localization_table(wrapper, samples, {"Oracle": (oracle, True)}, layers=[0, 2])
    assert [(r["method"], r["layer"], r["n"]) for r in rows] == [("Oracle", 0, 4), ("Oracle", 2, 4)]
    assert rows[0]["pointing"] == 0.5 and rows[0]["distractor"] == 0.5 and rows[0]["energy"] == 0.5
    assert rows[0]["seconds_per_map"] > 0


# ------------------------------------------------------------------------------------------- pinned on the demo
# Measured on the shipped demo model, 40 held-out samples (split "test", seed 1): occlusion 0.675 on the evidence and
# 0.200 on a distractor; GradCAM at the auto layer (0) 0.700 and 0.175. Pinned with a margin of 2 samples (0.05).
N_PINNED = 40
PINNED = dict(occlusion_pointing=0.625, occlusion_distractor=0.25, gradcam_pointing=0.65, gradcam_distractor=0.225)


@pytest.fixture(scope="module")
def demo():
    from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples

    model, processor = load_demo_model()
    samples = make_demo_samples(N_PINNED, seed=1, split="test")
    return QwenVLWrapper(model, processor, samples[0].prompt), samples


def test_occlusion_reference_points_at_the_evidence(demo):
    wrapper, samples = demo
    from pytorch_grad_cam_vlm.localization import occlusion_method

    [row] = localization_table(wrapper, samples, {"Occlusion": (occlusion_method(), False)})
    assert row["pointing"] >= PINNED["occlusion_pointing"]
    assert row["distractor"] <= PINNED["occlusion_distractor"]


def test_gradcam_at_the_auto_layer_points_at_the_evidence(demo):
    from pytorch_grad_cam import GradCAM

    wrapper, samples = demo
    layer = auto_layer(wrapper)
    rows = localization_table(wrapper, samples, {"GradCAM": (grad_cam_method(GradCAM), True)}, layers=[layer])
    assert rows[0]["pointing"] >= PINNED["gradcam_pointing"]
    assert rows[0]["distractor"] <= PINNED["gradcam_distractor"]
    assert f"| GradCAM | {layer} |" in table_markdown(rows)


# Measured on the same 40 samples: GradCAM++ at the auto layer (0) 0.900 on the evidence and 0.075 on a distractor
# (the best gradient method, cf. benchmarks/localization_table.md on 200 samples); the last token's raw attention at
# layer 0 0.700 and 0.275. Pinned with a margin of 2 samples.
def test_gradcam_plus_plus_and_attention_rows_beside_occlusion(demo):
    from pytorch_grad_cam import GradCAMPlusPlus

    from pytorch_grad_cam_vlm.attention import AttentionMap

    wrapper, samples = demo
    rows = localization_table(wrapper, samples, {"GradCAMPlusPlus": (grad_cam_method(GradCAMPlusPlus), True),
                                                 "Attention": (grad_cam_method(AttentionMap), True)},
                              layers=[auto_layer(wrapper)])
    by_method = {row["method"]: row for row in rows}
    assert by_method["GradCAMPlusPlus"]["pointing"] >= 0.85 and by_method["GradCAMPlusPlus"]["distractor"] <= 0.125
    assert by_method["Attention"]["pointing"] >= 0.65 and by_method["Attention"]["distractor"] <= 0.325
    assert "| Attention | 0 |" in table_markdown(rows)


def test_vision_encoder_rows_in_the_table(demo):
    """The table's vision-encoder rows: GradCAM++ on the merger, measured 0.650 / 0.175 on these 40 samples."""
    from pytorch_grad_cam_vlm.localization import default_methods

    wrapper, samples = demo
    name = "GradCAMPlusPlus (merger)"
    [row] = localization_table(wrapper, samples, {name: default_methods()[name]})
    assert row["layer"] is None and row["pointing"] >= 0.6 and row["distractor"] <= 0.225
    assert f"| {name} | - |" in table_markdown([row])
