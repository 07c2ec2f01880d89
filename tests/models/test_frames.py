"""Maps on the user's image, every family: a map hot on one token cell of the model's input, carried by the wrapper's
``image_frame``, lands where the family's own processor took that cell's pixels from (within half a cell), for two
aspect ratios each, one of them letterboxed, cropped or cut into pan-and-scan crops where the family does that.

The truth comes from the processor itself, not from the frame's arithmetic: the picture is a coordinate ramp (red
= x, green = y, blue = 255 on the picture), so each pixel of the preprocessed input says which picture pixel it was
resampled from, and the letterbox (blue 0) says where the picture is not.
"""
import numpy as np
import pytest
import torch
import torchvision

from conftest import PROMPT
from pytorch_grad_cam_vlm import (ClassifierWrapper, CLIPWrapper, Gemma3Wrapper, Idefics3Wrapper, InternVLWrapper,
                                  LlavaWrapper, Qwen3VLWrapper, QwenVLWrapper, build_tiny_clip, build_tiny_gemma3,
                                  build_tiny_idefics3, build_tiny_internvl, build_tiny_llava, build_tiny_model,
                                  build_tiny_qwen3_vl)
from pytorch_grad_cam_vlm.models.frame import ImageFrame, prepare_images

CELLS = 9  # token cells checked per picture, spread over the picture


def coordinate_image(height, width):
    """A picture whose red channel is its x coordinate and green its y (scaled to 0..255), blue 255."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.full_like(xs, 255)], -1)
    return rgb.round().astype(np.uint8)


def cell_errors(wrapper, size, cell=None):
    """For up to CELLS token cells of the input that lie wholly on the picture: ``(error, half)`` per axis, the
    distance between the hot cell's centroid carried onto the picture and the mean picture coordinate of the
    cell's pixels as the processor resampled them, and half the cell's extent on the picture."""
    height, width = size
    x = wrapper.preprocess(coordinate_image(height, width))
    rgb = wrapper.to_rgb(x)[0].astype(np.float64)
    coords = np.stack([rgb[..., 1] * (height - 1), rgb[..., 0] * (width - 1)], -1)  # (y, x) on the picture
    frame = wrapper.image_frame(size, tuple(x.shape[2:]))
    cell = cell or wrapper.token_cell
    rows, cols = x.shape[2] // cell, x.shape[3] // cell
    inside = [(i, j) for i in range(rows) for j in range(cols)
              if rgb[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell, 2].min() > 0.99]
    assert inside, "no token cell lies wholly on the picture"
    chosen = [inside[k] for k in np.unique(np.linspace(0, len(inside) - 1, CELLS).round().astype(int))]
    maps = np.zeros((len(chosen),) + tuple(x.shape[2:]), np.float32)
    for k, (i, j) in enumerate(chosen):
        maps[k, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = 1
    carried = frame.to_image(maps)
    assert carried.shape == (len(chosen), height, width)
    grid = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    results = []
    for k, (i, j) in enumerate(chosen):
        weights = np.nan_to_num(carried[k])
        assert weights.sum() > 0, f"cell {(i, j)} vanished"
        centroid = np.array([(weights * grid[a]).sum() / weights.sum() for a in (0, 1)])
        block = coords[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
        truth = block.reshape(-1, 2).mean(0) + 0.5
        # The cell's extent on the picture, from the processor's own resampling: first to last row (column) of
        # picture coordinates inside the cell, one input pixel more.
        extent = np.array([(block[-1, :, 0].mean() - block[0, :, 0].mean()) * cell / (cell - 1),
                           (block[:, -1, 1].mean() - block[:, 0, 1].mean()) * cell / (cell - 1)])
        results.append((np.abs(centroid - truth), extent / 2))
    return frame, results


def assert_cells_land(wrapper, size, cell=None):
    """Within half a cell, as issue 26 asks; measured within 0.04 of half a cell on every family here, so the test
    holds the frames to a quarter (a frame that ignores a letterbox or a crop misses by 1.5 to 3.8 halves)."""
    frame, results = cell_errors(wrapper, size, cell)
    for error, half in results:
        assert np.all(error <= 0.25 * half), (size, error, half)
    return frame


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("frames")


def wrapped(cls, built, **kwargs):
    return cls(built[0], built[1], prompt=PROMPT, **kwargs)


# ------------------------------------------------------------------------------------------- plain resizes
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_cells_land(tiny_dir, family):
    wrapper = wrapped(QwenVLWrapper, build_tiny_model(tiny_dir / family, family=family))
    for size in [(70, 150), (150, 90)]:
        frame = assert_cells_land(wrapper, size)
        assert frame.seen.all()


def test_qwen3_cells_land(tiny_dir):
    wrapper = wrapped(Qwen3VLWrapper, build_tiny_qwen3_vl(tiny_dir / "qwen3_vl"))
    for size in [(70, 150), (150, 90)]:
        assert_cells_land(wrapper, size)


def test_internvl_cells_land(tiny_dir):
    wrapper = wrapped(InternVLWrapper, build_tiny_internvl(tiny_dir / "internvl"))
    for size in [(40, 100), (90, 50)]:  # 1x3 / 2x1 tiles, the picture stretched onto them
        assert_cells_land(wrapper, size)


@pytest.mark.parametrize("family", ["smolvlm", "idefics3"])
def test_idefics3_cells_land(tiny_dir, family):
    built = build_tiny_idefics3(tiny_dir / family, family=family)
    wrapper = Idefics3Wrapper(built[0], built[1], prompt=PROMPT)
    for size in [(40, 100), (100, 70)]:
        assert_cells_land(wrapper, size)


# ------------------------------------------------------------------------------------------- letterbox and crops
@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_cells_land_through_the_letterbox(tiny_dir, family):
    """The canvas letterboxes both pictures (bands above and below, then left and right); no picture pixel is lost
    and the bands carry nothing."""
    wrapper = wrapped(LlavaWrapper, build_tiny_llava(tiny_dir / family, family=family))
    for size in [(56, 105), (100, 45)]:
        x = wrapper.preprocess(coordinate_image(*size))
        assert (wrapper.to_rgb(x)[0][..., 2] < 0.01).any(), "expected a letterboxed canvas"
        frame = assert_cells_land(wrapper, size)
        assert frame.seen.all()


def test_llava15_center_crop_is_not_seen(tiny_dir):
    """LLaVA 1.5's processor crops the center square: the cells land, and the picture's columns (rows) outside the
    crop, as the processor's output shows them, are NaN."""
    wrapper = wrapped(LlavaWrapper, build_tiny_llava(tiny_dir / "llava", family="llava"))
    for size in [(48, 96), (90, 40)]:
        frame = assert_cells_land(wrapper, size)
        assert_unseen_matches_processor(wrapper, frame, size)


def assert_unseen_matches_processor(wrapper, frame, size):
    """The frame's seen rows and columns are those the processor's input covers (within its resampling: a pixel
    and the ramp's rounding)."""
    height, width = size
    rgb = wrapper.to_rgb(wrapper.preprocess(coordinate_image(height, width)))[0]
    seen = frame.seen
    for axis, channel, length in ((1, 0, width), (0, 1, height)):
        covered = np.flatnonzero(seen.any(axis=1 - axis))
        values = rgb[..., channel] * (length - 1)
        slack = 1 + length / 255
        assert abs(covered[0] - values.min()) <= slack and abs(covered[-1] - values.max()) <= slack
    assert not seen.all() and np.isnan(frame.to_image(np.ones(frame.input_size))).sum() == (~seen).sum()


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2"])
def test_clip_family_cells_land(tiny_dir, family):
    built = build_tiny_clip(tiny_dir / family, family=family)
    wrapper = CLIPWrapper(built[0], built[1], texts=["a cat", "a dog"])
    for size in [(40, 90), (100, 60)]:
        frame = assert_cells_land(wrapper, size)
        if family == "clip":
            assert_unseen_matches_processor(wrapper, frame, size)
        else:
            assert frame.seen.all()


def test_gemma3_cells_land_on_pan_and_scan_crops(tiny_dir):
    built = build_tiny_gemma3(tiny_dir / "gemma3")
    square = Gemma3Wrapper(built[0], built[1], prompt=PROMPT)
    assert_cells_land(square, (60, 100))
    crops = Gemma3Wrapper(built[0], built[1], prompt=PROMPT, pan_and_scan=True)
    for size in [(260, 1030), (700, 300)]:  # 4 crops, the last narrower; 2 crops down a portrait
        frame = assert_cells_land(crops, size)
        assert len(frame.pieces) > 1 and frame.seen.all()


def test_classifier_center_crop(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=1, num_heads=2,
                                                 hidden_dim=16, mlp_dim=16, num_classes=3).eval()
    wrapper = ClassifierWrapper(model)
    for size in [(90, 150), (160, 80)]:
        frame = assert_cells_land(wrapper, size)
        assert_unseen_matches_processor(wrapper, frame, size)


# ------------------------------------------------------------------------------------------- explain's frames
def test_explain_on_images_gives_maps_on_them(tiny_dir):
    """explain(wrapper, picture) preprocesses it and gives maps of the picture's size, equal to the model-frame
    maps carried by the frame; a tensor with image_size gives the same; a tensor alone stays on the input."""
    from pytorch_grad_cam_vlm import explain

    wrapper = wrapped(LlavaWrapper, build_tiny_llava(tiny_dir / "llava_next_explain", family="llava_next"))
    picture = coordinate_image(56, 105)
    result = explain(wrapper, picture, method="GradCAM", layers="0")
    assert result.maps.shape == (1, 56, 105) and result.model_maps.shape == (1, 64, 64)
    np.testing.assert_array_equal(result.maps[0], result.frames[0].to_image(result.model_maps[0]))
    x = wrapper.preprocess(picture)
    again = explain(wrapper, x, method="GradCAM", layers="0", image_size=(56, 105))
    np.testing.assert_allclose(again.maps, result.maps, atol=1e-6)
    plain = explain(wrapper, x, method="GradCAM", layers="0")
    np.testing.assert_array_equal(plain.maps, plain.model_maps)


def test_prepare_images_refuses_mixed_sizes_and_counts(tiny_dir):
    wrapper = wrapped(QwenVLWrapper, build_tiny_model(tiny_dir / "qwen_prepare"))
    with pytest.raises(ValueError, match="different sizes .* one call at a time"):
        prepare_images(wrapper, [coordinate_image(56, 56), coordinate_image(56, 84)])
    x = torch.zeros(2, 3, 56, 56)
    with pytest.raises(ValueError, match="3 image sizes for 2 inputs"):
        prepare_images(wrapper, x, [(56, 56)] * 3)
    with pytest.raises(ValueError, match="image_size goes with preprocessed inputs"):
        prepare_images(wrapper, coordinate_image(56, 56), (56, 56))


def test_frame_pieces_by_hand():
    """A letterbox drops the bands without bleeding them in; a crop leaves NaN outside; values are bilinear."""
    frame = ImageFrame.letterboxed((4, 8), (8, 8), (2, 0, 4, 8))
    maps = np.zeros((8, 8), np.float32)
    maps[2:6] = np.arange(8)
    np.testing.assert_allclose(frame.to_image(maps), np.tile(np.arange(8.0), (4, 1)))
    crop = ImageFrame.cropped((4, 8), (4, 8), (0, 2, 4, 4))
    carried = crop.to_image(np.ones((4, 4)))
    assert np.isnan(carried[:, :2]).all() and np.isnan(carried[:, 6:]).all() and (carried[:, 2:6] == 1).all()
    with pytest.raises(ValueError, match="4x4 input"):
        crop.to_image(np.ones((5, 4)))


# ------------------------------------------------------------------------------------------- OneVision's mixing
@pytest.mark.parametrize("size,small", [((14, 16), (11, 12)), ((27, 40), (12, 17))])
def test_unmix_is_the_transpose_of_the_models_downsampling(size, small):
    """anyres.unmix spreads each token over the cells OneVision's bilinear downsampling mixed it from, by those
    weights: it equals the vector-Jacobian product of the model's own ``F.interpolate(..., mode="bilinear")``."""
    from pytorch_grad_cam_vlm.models.anyres import unmix

    torch.manual_seed(0)
    big = torch.randn(2, 3, *size, requires_grad=True)
    relevance = torch.randn(2, 3, *small)
    downsampled = torch.nn.functional.interpolate(big, list(small), mode="bilinear")
    (expected,) = torch.autograd.grad(downsampled, big, relevance)
    torch.testing.assert_close(unmix(relevance, size), expected, atol=1e-6, rtol=0)
