"""Localization metrics: the occlusion reference, the pointing game and the energy in a box."""
import numpy as np
import pytest
import torch

from pytorch_grad_cam_vlm.metrics.localization import energy_in_box, map_peak, occlusion_map, pointing_hit


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
    cam = occlusion_map(RegionScore(box), torch.ones(1, 3, 112, 112), target=1)
    assert cam.shape == (112, 112)
    x, y = map_peak(cam)
    assert 56 <= x < 84 and 28 <= y < 56
    # the window exactly on the region hides all of it: 28*28*3 ones; the pixels there are covered by 4 windows
    # (stride 14) whose mean drop is (2352 + 1176 + 1176 + 588) / 4
    assert cam[40, 70] == pytest.approx((2352 + 1176 + 1176 + 588) / 4)
    assert cam[0, 0] == 0


def test_occlusion_map_takes_a_grad_cam_target():
    """A grad-cam target (here the difference of the two outputs, as a contrastive target would be) is scored on each
    occluded image's output row: at token-cell windows with no overlap, each cell's drop is that cell's sum."""
    box = (28, 0, 56, 28)
    x = torch.rand(1, 3, 56, 84, generator=torch.Generator().manual_seed(0))
    cam = occlusion_map(RegionScore(box), x, lambda row: row[1] - row[0], window=28, stride=28)
    by_id = occlusion_map(RegionScore(box), x, 1, window=28, stride=28)
    np.testing.assert_allclose(cam, by_id, atol=1e-5)  # row[0] is 0: the same target
    assert cam[0, 28] == pytest.approx(float(x[0, :, :28, 28:56].sum()), rel=1e-5) and cam[0, 0] == 0
    assert cam[28:, :].max() == 0
    clean = float(x[0, :, :28, 28:56].sum())  # the target on x: what a check measured already, one image fewer
    np.testing.assert_allclose(occlusion_map(RegionScore(box), x, 1, window=28, stride=28, clean=clean), by_id,
                               rtol=1e-5)
    np.testing.assert_allclose(occlusion_map(RegionScore(box), x, 1, window=28, stride=28, clean=clean + 1),
                               by_id + 1, rtol=1e-5)  # every drop is read against the clean score given


def test_occlusion_map_refuses_a_batch():
    with pytest.raises(ValueError, match="one image"):
        occlusion_map(RegionScore((0, 0, 28, 28)), torch.ones(2, 3, 56, 56), target=1)


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
