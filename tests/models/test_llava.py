"""LlavaWrapper on tiny LLaVA 1.5, LLaVA-NeXT and LLaVA-OneVision models: QwenVLWrapper's contract, checked against
the processor path, perturbations of single cells and tiles, hand-made Grad-CAM and raw attention weights."""
import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import (PROMPT, VLM_METHODS, assert_fullgrad_refused, assert_projector_candidate,
                      assert_state_kept_through_gradcam, chat_inputs, check_cli_explain,
                      check_method_on_decoder_and_vision, hidden_and_grad, model_state, partly_frozen_in_train_mode,
                      random_image)
from pytorch_grad_cam_vlm import AttentionMap, AttentionRollout, LlavaWrapper, build_tiny_llava, explain
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS

FAMILIES = ["llava", "llava_next", "llava_onevision"]
G = 4  # tokens per side of a tile (and of LLaVA 1.5's image): 32-pixel tiles of 8-pixel patches
# The next-token logits of the wrapper (base image resized from the canvas in torch) and of the processor (base image
# resized from the original picture) differ by at most this on pictures of shapes; measured 2.9e-3 (NeXT) and 1.6e-3
# (OneVision) over 24 such pictures of 8 sizes, with logits of standard deviation ~0.15. Random-noise pictures, all
# of whose energy lies at the highest frequencies, where two resamplings differ most, give up to 5e-2.
BASE_IMAGE_BOUND = 5e-3


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, model, processor, folder) of a tiny random model saved and loaded back (see models/tiny/llava.py)."""
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model, processor = build_tiny_llava(folder, family=request.param, seed=0)
    return request.param, model, processor, str(folder)


def wrap(tiny, **kwargs):
    return LlavaWrapper(tiny[1], tiny[2], prompt=PROMPT, **kwargs)


def shapes_image(height, width, seed=0):
    """A picture of three filled discs on a plain background: smooth areas and sharp edges, like a photo's."""
    rs = np.random.RandomState(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rs.randint(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y, r = rs.randint(0, width), rs.randint(0, height), rs.randint(3, max(4, min(height, width) // 2))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rs.randint(0, 255, 3)))
    return np.asarray(image).copy()


def unpadded(h0, w0, grid_h, grid_w):
    """(top, left, rows, cols) of the tile-token grid that survives unpadding, by hand from transformers'
    unpad_image: the side the picture does not fill loses (grid - round-down(picture side at grid scale)) // 2 rows
    or columns at each end."""
    if w0 / h0 > grid_w / grid_h:
        pad = (grid_h - int(h0 * grid_w / w0)) // 2
        return pad, 0, grid_h - 2 * pad, grid_w
    pad = (grid_w - int(w0 * grid_h / h0)) // 2
    return 0, pad, grid_h, grid_w - 2 * pad


def gradcam_by_hand(activations, grads):
    """Grad-CAM before its ReLU of one image's (C, h, w) activations and gradients."""
    return (activations * grads.mean((1, 2))[:, None, None]).sum(0)


def pipeline(cam, x):
    """grad-cam's post-processing of one layer's map: scale to [0, 1] and resize, then scale the layer mean again."""
    return scale_cam_image(scale_cam_image(cam[None], (x.shape[3], x.shape[2])))


def on_canvas(grid, region, canvas_grid):
    """A (C, h, w) grid resized (bilinear) to the region (top, left, rows, cols) of a zero (C, H, W) canvas grid."""
    top, left, rows, cols = region
    resized = F.interpolate(grid[None], size=(rows, cols), mode="bilinear", align_corners=False)[0]
    canvas = torch.zeros(grid.shape[0], *canvas_grid)
    canvas[:, top:top + rows, left:left + cols] = resized
    return canvas


def views_by_hand(tokens, h0, w0, canvas):
    """An anyres decoder layer's (n_image_tokens, C) rows at the image positions, by hand: the base image's G x G
    grid and the unpadded tile grid (newline columns dropped), both on the canvas's tile-token grid."""
    grid = (canvas[0] // 8, canvas[1] // 8)
    top, left, rows, cols = region = unpadded(h0, w0, *grid)
    base = tokens[:G * G].T.reshape(-1, G, G)
    tiles = torch.zeros(tokens.shape[1], *grid)
    packed = tokens[G * G:]
    assert len(packed) == rows * (cols + 1)
    for r in range(rows):
        for c in range(cols):
            tiles[:, top + r, left + c] = packed[r * (cols + 1) + c]
    return tiles, on_canvas(base, region, grid)


# ------------------------------------------------------------------------------------------- inputs and logits
@pytest.mark.parametrize("size", [(48, 48), (40, 70), (100, 30), (120, 130)])
def test_logits_equal_processor_path(tiny, size):
    """LLaVA 1.5: the processor's square crop, logits to 1e-4. Anyres: the canvas's tiles are exactly the
    processor's; with the processor's own base image the logits agree to 1e-5, with the base image resized from the
    canvas in torch (what forward does) to BASE_IMAGE_BOUND. Sizes: square, non-square on a square tiling, non-square
    on a non-square tiling (3x1 / 4x1 tiles), and one that OneVision downsamples."""
    family, model, processor, _ = tiny
    image = shapes_image(*size, seed=1)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    inputs = chat_inputs(processor, image)
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        logits = wrapper(x)
        assert logits.dtype == torch.float32 and logits.shape == reference.shape == (1, len(processor.tokenizer))
        if family == "llava":
            assert torch.equal(x, inputs["pixel_values"]) and x.shape == (1, 3, 32, 32)
            torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
            return
        assert wrapper.source_size == size and tuple(x.shape[2:]) == wrapper.canvas_size(size)
        built = wrapper.model_inputs(x)
        n = built["pixel_values"].shape[1]
        assert torch.equal(built["pixel_values"][:, 1:], inputs["pixel_values"][:, 1:n])
        assert torch.equal(built["input_ids"], inputs["input_ids"])
        exact = model(**wrapper.model_inputs(x, base_images=wrapper.processor_base_image(image))).logits[:, -1]
    torch.testing.assert_close(exact, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference, atol=BASE_IMAGE_BOUND, rtol=0)


def test_anyres_geometry_follows_the_model(tiny):
    """Canvas, tiles, unpadded grid and packed grid for pictures of three shapes, against numbers worked out by hand
    from the released rules; OneVision downsamples the 14x16 unpadded grid of a 4x4 tiling (more than 9 tiles' worth)
    by ratio sqrt(224 / 144) to 11x12."""
    family, _, processor, _ = tiny
    if family == "llava":
        pytest.skip("LLaVA 1.5 has no tiles")
    expected = {  # source size: canvas, tiles, unpadded (top, left, rows, cols), packed
        "llava_next": {(100, 30): ((96, 32), (3, 1), (0, 0, 12, 4), (12, 4)),
                       (40, 70): ((64, 64), (2, 2), (2, 0, 4, 8), (4, 8)),
                       (120, 130): ((64, 64), (2, 2), (0, 0, 8, 8), (8, 8))},
        "llava_onevision": {(100, 30): ((128, 32), (4, 1), (1, 0, 14, 4), (14, 4)),
                            (40, 70): ((64, 96), (2, 3), (1, 0, 6, 12), (6, 12)),
                            (120, 130): ((128, 128), (4, 4), (1, 0, 14, 16), (11, 12))}}[family]
    wrapper = wrap(tiny)
    for size, (canvas, tiles, region, packed) in expected.items():
        x = wrapper.preprocess(random_image(*size))
        layout = wrapper.layout_for(*x.shape[2:])
        assert (tuple(x.shape[2:]), layout.tiles, layout.unpadded, layout.packed) == (canvas, tiles, region, packed)
        assert region == unpadded(*size, canvas[0] // 8, canvas[1] // 8)
        assert len(layout.image_positions) == G * G + packed[0] * (packed[1] + 1)
    with pytest.raises(ValueError, match="not the canvas of a 120x130 picture"):
        wrapper(torch.zeros(1, 3, 32, 32))


def test_answer_score_equals_processor_path(tiny):
    family, model, processor, _ = tiny
    image = shapes_image(40, 70, seed=3)
    wrapper = wrap(tiny, answer=" red circle")
    x = wrapper.preprocess(image)
    inputs = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt")
    answer = wrapper.layout_for(*x.shape[2:]).answer_ids
    assert processor.tokenizer.decode(answer).strip() == "red circle"
    with torch.no_grad():
        log_probs = model(**inputs).logits[0, -len(answer) - 1:-1].log_softmax(-1)
        score = wrapper(x)
    expected = log_probs.gather(-1, answer[:, None]).sum()
    assert score.shape == (1, 1)
    torch.testing.assert_close(score[0, 0], expected, atol=1e-4 if family == "llava" else BASE_IMAGE_BOUND, rtol=0)


# ------------------------------------------------------------------------------------------- the grid
def change_maps(wrapper, layer, x, regions):
    """The norm of the change of ``layer``'s reshaped output when each region (y0, y1, x0, x1) of ``x`` is raised
    by 1 (all in one batch), ``(regions, h, w)``."""
    batch = x.repeat(len(regions) + 1, 1, 1, 1)
    for k, (y0, y1, x0, x1) in enumerate(regions):
        batch[k + 1, :, y0:y1, x0:x1] += 1.0
    store = {}
    handle = layer.register_forward_hook(lambda m, a, o: store.__setitem__("grid", wrapper.reshape_transform(o)))
    with torch.no_grad():
        wrapper(batch)
    handle.remove()
    return (store["grid"][1:] - store["grid"][:1]).norm(dim=1)


def test_one_changed_cell_moves_its_own_cell_most(tiny):
    """Decoder layer 0: change one 8-pixel cell of the input (LLaVA 1.5: each of its 4x4; anyres, view "tiles": each
    cell of the unpadded tile grid) and the map's largest change lands on that cell."""
    family, _, _, _ = tiny
    wrapper = wrap(tiny, view="tiles")
    x = wrapper.preprocess(random_image(100, 30, seed=5))
    layout = wrapper.layout_for(*x.shape[2:])
    top, left, rows, cols = layout.unpadded if family != "llava" else (0, 0, G, G)
    cells = [(top + r, left + c) for r in range(rows) for c in range(cols)]
    change = change_maps(wrapper, wrapper.decoder_layers[0], x,
                         [(8 * r, 8 * r + 8, 8 * c, 8 * c + 8) for r, c in cells])
    assert change.shape[1:] == (x.shape[2] // 8, x.shape[3] // 8)
    width = change.shape[2]
    assert [divmod(int(i), width) for i in change.flatten(1).argmax(1)] == cells


def test_one_changed_tile_moves_its_own_tile_most(tiny):
    """Anyres, view "tiles", decoder layer 0: change one tile of a 4x4 (OneVision: downsampled to 11x12 tokens) or
    2x2 canvas and the map's largest change lies inside that tile."""
    family, _, _, _ = tiny
    if family == "llava":
        pytest.skip("LLaVA 1.5 has no tiles")
    wrapper = wrap(tiny, view="tiles")
    x = wrapper.preprocess(random_image(120, 130, seed=6))
    rows, cols = wrapper.layout_for(*x.shape[2:]).tiles
    tiles = [(i, j) for i in range(rows) for j in range(cols)]
    change = change_maps(wrapper, wrapper.decoder_layers[0], x,
                         [(32 * i, 32 * i + 32, 32 * j, 32 * j + 32) for i, j in tiles])
    width = change.shape[2]
    landed = [tuple(v // G for v in divmod(int(k), width)) for k in change.flatten(1).argmax(1)]
    assert landed == tiles


def test_one_changed_base_cell_moves_its_own_base_cell_most(tiny):
    """Anyres, view "base", decoder layer 0: change the part of the picture one base-image token covers (the
    picture's area of the canvas cut in 4x4) and the largest change of the base map, resized onto the unpadded grid,
    lies over that part."""
    family, _, _, _ = tiny
    if family == "llava":
        pytest.skip("LLaVA 1.5 has no base image besides its one image")
    wrapper = wrap(tiny, view="base")
    x = wrapper.preprocess(random_image(40, 70, seed=7))
    layout = wrapper.layout_for(*x.shape[2:])
    y0, x0, h, w = layout.content_box
    top, left, rows, cols = layout.unpadded
    cells = [(i, j) for i in range(G) for j in range(G)]
    regions = [(y0 + h * i // G, y0 + h * (i + 1) // G, x0 + w * j // G, x0 + w * (j + 1) // G) for i, j in cells]
    change = change_maps(wrapper, wrapper.decoder_layers[0], x, regions)
    width = change.shape[2]
    landed = []
    for k in change.flatten(1).argmax(1):
        r, c = divmod(int(k), width)
        landed.append((int((r - top + 0.5) * G / rows), int((c - left + 0.5) * G / cols)))
    assert landed == cells


# ------------------------------------------------------------------------------------------- Grad-CAM by hand
@pytest.mark.parametrize("view", ["tiles", "base", "combined"])
def test_decoder_gradcam_equals_direct_computation(tiny, view):
    """Grad-CAM of decoder layer 1 by hand on the raw model with hooks: the processor's inputs (anyres: with the
    base image the wrapper resizes from the canvas), the image tokens placed on the grid by hand. "combined" is the
    ReLU of the sum of the tile and base maps before their ReLU, each with its own channel weights."""
    family, model, processor, _ = tiny
    if family == "llava" and view != "base":
        pytest.skip("LLaVA 1.5 has one view")
    size = (40, 70)
    image = random_image(*size, seed=8)
    wrapper = wrap(tiny, view=view)
    x = wrapper.preprocess(image)
    inputs = chat_inputs(processor, image)
    if family != "llava":
        inputs["pixel_values"][:, 0] = wrapper.model_inputs(x)["pixel_values"][:, 0]
    layer = model.model.language_model.layers[1]
    hidden, grad, target = hidden_and_grad(model, inputs, layer)
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    if family == "llava":
        cam = torch.relu(gradcam_by_hand(hidden[0, positions].T.reshape(-1, G, G),
                                         grad[0, positions].T.reshape(-1, G, G)))
    else:
        (a_tiles, a_base), (g_tiles, g_base) = (views_by_hand(t[0, positions], *size, x.shape[2:])
                                                for t in (hidden, grad))
        cam_tiles, cam_base = gradcam_by_hand(a_tiles, g_tiles), gradcam_by_hand(a_base, g_base)
        cam = torch.relu({"tiles": cam_tiles, "base": cam_base, "combined": cam_tiles + cam_base}[view])
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam_method:
        maps = cam_method(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    assert maps.shape == (1,) + tuple(x.shape[2:]) and maps.max() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(maps, pipeline(cam.numpy(), x), atol=1e-4)


def test_vision_gradcam_equals_direct_computation_with_and_without_graph_start(tiny):
    """Vision block 1 (the feature layer of LLaVA 1.5 and NeXT, -2; OneVision reads block 2): by hand on the raw model,
    LLaVA 1.5's patch grid without the class token; anyres (view "tiles") the tile rows put together on the canvas
    grid, cropped to the unpadded region. Equal with the graph started at the block and with the whole graph."""
    family, model, processor, _ = tiny
    size = (40, 70)
    image = random_image(*size, seed=9)
    probe = wrap(tiny, view="tiles")
    x = probe.preprocess(image)
    inputs = chat_inputs(processor, image)
    if family != "llava":
        inputs["pixel_values"][:, 0] = probe.model_inputs(x)["pixel_values"][:, 0]
    layer = probe.vision_tower.encoder.layers[1]
    hidden, grad, target = hidden_and_grad(model, inputs, layer)

    def grid(rows):  # (images, [CLS +] 16, C) -> (C, h, w)
        patches = rows[:, rows.shape[1] - G * G:]
        if family == "llava":
            return patches[0].T.reshape(-1, G, G)
        height, width = x.shape[2] // 8, x.shape[3] // 8
        full = torch.zeros(rows.shape[-1], height, width)
        tiles_per_row = width // G
        for k, tile in enumerate(patches[1:1 + (height // G) * tiles_per_row]):
            i, j = divmod(k, tiles_per_row)
            full[:, G * i:G * i + G, G * j:G * j + G] = tile.T.reshape(-1, G, G)
        top, left, r, c = unpadded(*size, height, width)
        kept = torch.zeros_like(full)
        kept[:, top:top + r, left:left + c] = full[:, top:top + r, left:left + c]
        return kept

    expected = pipeline(torch.relu(gradcam_by_hand(grid(hidden), grid(grad))).numpy(), x)
    for efficient in (True, False):
        wrapper = wrap(tiny, view="tiles", efficient_gradients=efficient, source_size=probe.source_size)
        with GradCAM(model=wrapper, target_layers=[wrapper.vision_blocks[1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
        model.zero_grad(set_to_none=True)  # without efficient gradients, grad-cam's backward fills weight gradients
        np.testing.assert_allclose(maps, expected, atol=1e-5, err_msg=f"efficient_gradients={efficient}")


def test_blank_layers_warn_and_name_working_ones(tiny):
    """The last decoder layer (at the image positions), and vision blocks after the feature layer (block 2 of the
    CLIP towers, read at -2; OneVision reads its last block) get no gradient: their maps are blank, and a warning
    names layers that have one; gradient-free methods run on them."""
    family, _, _, _ = tiny
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(40, 70))
    with pytest.warns(UserWarning, match=r"decoder_layers\[-2\] \(layer 2\)"):
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[-1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            assert cam(input_tensor=x, targets=None).max() == 0
    assert wrapper.feature_blocks == ([2] if family == "llava_onevision" else [1])
    if family != "llava_onevision":
        with pytest.warns(UserWarning, match=r"after the deepest feature layer .* i <= 1"):
            with GradCAM(model=wrapper, target_layers=[wrapper.vision_blocks[2]],
                         reshape_transform=wrapper.reshape_transform) as cam:
                assert cam(input_tensor=x, targets=None).max() == 0
        with pytest.warns(UserWarning, match="after the deepest feature layer"), \
                EigenCAM(model=wrapper, target_layers=[wrapper.vision_blocks[2]],
                         reshape_transform=wrapper.reshape_transform) as cam:
            assert cam(input_tensor=x, targets=None).max() == pytest.approx(1, abs=1e-5)


# ------------------------------------------------------------------------------------------- methods and state
@pytest.mark.parametrize("method", VLM_METHODS, ids=lambda m: m.__name__)
def test_every_method_runs_at_batch_1_and_2(tiny, method):
    """README's method table: each method on decoder layer 0 at batch 2 (view "combined": 2C channels) and on
    vision block 1 at batch 1 (AblationCAM: decoder layers only, refused on a vision block with the model intact)."""
    family, model, processor, _ = tiny
    wrapper = wrap(tiny)
    check_method_on_decoder_and_vision(method, model, wrapper, wrapper.preprocess(random_image(40, 70, seed=10)),
                                       wrapper.decoder_layers[0], "vision blocks and the projector are not supported")


def test_smoothing_targets_and_road_run(tiny):
    """aug_smooth (flips and brightness on the canvas), eigen_smooth, softmax targets, SmoothGradCAM's noise in
    pixel space and grad-cam's ROAD on the wrapper."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from pytorch_grad_cam_vlm import SmoothGradCAM

    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(100, 30, seed=15))
    layers = [wrapper.decoder_layers[0]]
    with GradCAM(model=wrapper, target_layers=layers, reshape_transform=wrapper.reshape_transform) as cam:
        smoothed = cam(input_tensor=x, targets=[ClassifierOutputSoftmaxTarget(5)], aug_smooth=True, eigen_smooth=True)
    with SmoothGradCAM(model=wrapper, target_layers=layers, reshape_transform=wrapper.reshape_transform,
                       n_samples=2) as cam:
        noisy = cam(input_tensor=x, targets=[ClassifierOutputTarget(5)])
    scores = ROADCombined(percentiles=[20, 80])(x, noisy, [ClassifierOutputTarget(5)], wrapper)
    assert smoothed.shape == noisy.shape == (1,) + tuple(x.shape[2:]) and np.isfinite(scores).all()


def test_fullgrad_raises_its_documented_error(tiny):
    wrapper = wrap(tiny)
    assert_fullgrad_refused(wrapper, wrapper.preprocess(random_image(40, 70)))


def test_the_projector_is_an_explain_candidate(tiny):
    wrapper = wrap(tiny)
    assert_projector_candidate(wrapper, wrapper.projector, wrapper.preprocess(random_image(40, 70)))


def test_model_state_restored_after_call_and_after_exception(tiny):
    family, model, processor, _ = tiny
    with partly_frozen_in_train_mode(model, model.model.vision_tower):
        wrapper = wrap(tiny)
        layers = [wrapper.decoder_layers[0], wrapper.vision_blocks[1], wrapper.projector]
        before = assert_state_kept_through_gradcam(model, wrapper, wrapper.preprocess(random_image(40, 70)), layers)
        with pytest.raises(ValueError, match="view must be one of"):
            wrap(tiny, view="tile")
        assert model_state(model) == before
# ------------------------------------------------------------------------------------------- attention
def test_attention_map_equals_output_attentions(tiny):
    """AttentionMap on decoder layer 1 equals the last position's head-mean attention read from output_attentions,
    placed on the grid by hand (anyres: view "tiles"); AttentionRollout runs at batch 2."""
    family, model, processor, _ = tiny
    size = (40, 70)
    image = random_image(*size, seed=11)
    wrapper = wrap(tiny, view="tiles")
    x = wrapper.preprocess(image)
    with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[1]]) as cam:
        maps = cam(input_tensor=x, targets=None)
    inputs = chat_inputs(processor, image)
    if family != "llava":
        inputs["pixel_values"][:, 0] = wrapper.model_inputs(x)["pixel_values"][:, 0]
    with wrapper.eager_attention(), torch.no_grad():
        row = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    if family == "llava":
        expected = row[positions].reshape(G, G)
    else:
        expected = views_by_hand(row[positions][:, None], *size, x.shape[2:])[0][0]
    np.testing.assert_allclose(maps, pipeline(expected.numpy(), x), atol=1e-5)
    with AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers) as cam:
        rollout = cam(input_tensor=torch.cat([x, x.flip(3)]), targets=None)
    assert rollout.shape == (2,) + tuple(x.shape[2:]) and rollout.max() == pytest.approx(1, abs=1e-5)


# ------------------------------------------------------------------------------------------- auto, registry and CLI
def test_explain_returns_a_map_of_the_input_size(tiny):
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(100, 30, seed=12))
    result = explain(wrapper, x)  # on the random llava_next, the occlusion fallback's map: every candidate fails
    assert result.maps.shape == (1,) + tuple(x.shape[2:]) and result.maps.dtype == np.float32
    assert result.methods[0] in AUTO_METHODS or result.layers[0] == "input" and not result.checks[0].failed
    result = explain(wrapper, x, fallback=False)
    assert result.candidate_layers == ["projector", 0, 1, 2] and result.methods[0] in AUTO_METHODS
    m, l = result.candidate_methods.index(result.methods[0]), result.candidate_layers.index(result.layers[0])
    np.testing.assert_array_equal(result.maps[0], result.candidate_maps[0, m, l])


def test_cli_explain_writes_maps_and_report(tiny, tmp_path, capsys):
    family, _, _, folder = tiny
    Image.fromarray(random_image(70, 40, seed=13)).save(tmp_path / "image.png")
    check_cli_explain(folder, family, LlavaWrapper, tmp_path / "image.png", tmp_path, capsys)


def test_input_boxes_follow_the_picture_onto_the_canvas(tiny):
    """A red rectangle in a black picture: the box input_boxes maps it to holds the red pixels of the input
    (anyres: the letterboxed canvas; LLaVA 1.5: the processor's resize of a square picture), to within the
    resampling's one-pixel blur."""
    family, _, _, _ = tiny
    wrapper = wrap(tiny)
    size, (x0, y0, x1, y1) = ((48, 48), (5, 10, 20, 30)) if family == "llava" else ((100, 30), (5, 40, 20, 70))
    picture = np.zeros(size + (3,), dtype=np.uint8)
    picture[y0:y1, x0:x1, 0] = 255
    red = wrapper.to_rgb(wrapper.preprocess(picture))[0, :, :, 0] > 0.5
    rows, cols = red.any(1).nonzero()[0], red.any(0).nonzero()[0]
    found = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    [mapped] = wrapper.input_boxes([(x0, y0, x1, y1)], size)
    assert np.abs(np.subtract(found, mapped)).max() <= 1, (found, mapped)


def test_benchmark_scores_a_sample_with_boxes(tiny, tmp_path):
    from pytorch_grad_cam_vlm import cli

    family, _, _, folder = tiny
    Image.fromarray(random_image(70, 40, seed=14)).save(tmp_path / "im0.png")
    with open(tmp_path / "data.jsonl", "w") as f:
        f.write(json.dumps(dict(image="im0.png", prompt=PROMPT, boxes=[[0, 0, 20, 35]],
                                distractor_boxes=[[20, 35, 40, 70]])) + "\n")
    out = str(tmp_path / "bench")
    assert cli.main(["benchmark", "--model", folder, "--data", str(tmp_path / "data.jsonl"), "--out", out,
                     "--layers", "1", "--methods", "GradCAM", "--percentiles", "10,60"]) == 0
    with open(os.path.join(out, "per_sample.csv")) as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["GradCAM", "RandomCAM"]  # RandomCAM: the benchmark's baseline
    assert all(row["pointing"] in ("0", "1") and row["distractor"] in ("0", "1") and 0 < float(row["energy"]) < 1
               and row["sanity"] != "" for row in rows.values())
