"""InternVLWrapper on a tiny InternVL: QwenVLWrapper's contract on dynamic tiles, a thumbnail and a pixel shuffle,
checked against the processor path, perturbations of single cells and hand-made Grad-CAM."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import (PROMPT, VLM_METHODS, assert_fullgrad_refused, assert_projector_candidate,
                      assert_state_kept_through_gradcam, chat_inputs, check_cli_explain,
                      check_method_on_decoder_and_vision, hidden_and_grad, model_state, partly_frozen_in_train_mode,
                      random_image)
from pytorch_grad_cam_vlm import AttentionMap, AttentionRollout, InternVLWrapper, build_tiny_internvl, explain
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS

S, G, P = 32, 4, 8  # the tiny model's tile side in pixels, tokens and patches per tile side (8-pixel tokens)
# The next-token logits of the wrapper (thumbnail resized from the canvas in torch) and of the processor (thumbnail
# resized from the original picture) differ by at most this on pictures of shapes: measured 3.0e-4 over 24 such
# pictures of 8 sizes and 1.9e-3 on random-noise pictures, with logits of standard deviation ~0.16; the thumbnail of
# another picture moves them by 0.05 to 0.1.
THUMBNAIL_BOUND = 1e-3
# Picture size -> (rows, columns) of tiles, by hand from get_optimal_tiled_canvas with 1..6 tiles of 32 px: the grid
# of the closest aspect ratio; on a tie the one with more tiles when the picture's area exceeds half of theirs.
TILINGS = {(30, 30): (1, 1), (40, 70): (1, 2), (70, 40): (2, 1), (60, 60): (2, 2), (100, 30): (3, 1)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, processor, folder) of a tiny random InternVL saved and loaded back (see models/tiny/internvl.py)."""
    folder = tmp_path_factory.mktemp("tiny_internvl")
    model, processor = build_tiny_internvl(folder, seed=0)
    return model, processor, str(folder)


def wrap(tiny, **kwargs):
    return InternVLWrapper(tiny[0], tiny[1], prompt=PROMPT, **kwargs)


def shapes_image(height, width, seed=0):
    """A picture of three filled discs on a plain background: smooth areas and sharp edges, like a photo's."""
    rs = np.random.RandomState(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rs.randint(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y, r = rs.randint(0, width), rs.randint(0, height), rs.randint(3, max(4, min(height, width) // 2))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rs.randint(0, 255, 3)))
    return np.asarray(image).copy()


def gradcam_by_hand(activations, grads):
    """Grad-CAM before its ReLU of one image's (C, h, w) activations and gradients."""
    return (activations * grads.mean((1, 2))[:, None, None]).sum(0)


def pipeline(cam, x):
    """grad-cam's post-processing of one layer's map: scale to [0, 1] and resize, then scale the layer mean again."""
    return scale_cam_image(scale_cam_image(cam[None], (x.shape[3], x.shape[2])))


def views_by_hand(grids, tiles):
    """Per image (tiles in raster order, then the thumbnail) (C, n, n) grids, by hand: the tiles put on their
    rectangles of the canvas grid, and the thumbnail resized (bilinear) over the whole of it."""
    rows, cols = tiles
    n = grids.shape[-1]
    canvas = torch.zeros(grids.shape[1], rows * n, cols * n)
    for k in range(rows * cols):
        i, j = divmod(k, cols)
        canvas[:, i * n:(i + 1) * n, j * n:(j + 1) * n] = grids[k]
    thumbnail = F.interpolate(grids[-1][None], size=(rows * n, cols * n), mode="bilinear", align_corners=False)[0]
    return canvas, thumbnail


def processor_inputs_with_wrapper_thumbnail(wrapper, processor, image, x):
    """The processor's inputs, with the thumbnail the wrapper resizes from the canvas in place of the processor's."""
    inputs = chat_inputs(processor, image)
    inputs["pixel_values"][-1] = wrapper.model_inputs(x)["pixel_values"][-1]
    return inputs


# ------------------------------------------------------------------------------------------- inputs and logits
@pytest.mark.parametrize("size", list(TILINGS), ids=lambda s: f"{s[0]}x{s[1]}")
def test_logits_equal_processor_path(tiny, size):
    """The canvas holds the processor's own tiles bit for bit and the prompt its tokens; with the processor's own
    thumbnail the logits agree to 1e-5, with the thumbnail resized from the canvas in torch (what forward does) to
    THUMBNAIL_BOUND; a one-tile picture has no thumbnail, and its logits agree to 1e-5."""
    model, processor, _ = tiny
    image = shapes_image(*size, seed=1)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    rows, cols = TILINGS[size]
    assert x.shape == (1, 3, rows * S, cols * S)
    inputs = chat_inputs(processor, image)
    built = wrapper.model_inputs(x)
    n = rows * cols
    assert torch.equal(built["pixel_values"][:n], inputs["pixel_values"][:n])
    assert torch.equal(built["input_ids"], inputs["input_ids"]) and len(built["pixel_values"]) == n + (n > 1)
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        logits = wrapper(x)
        assert logits.dtype == torch.float32 and logits.shape == reference.shape == (1, len(processor.tokenizer))
        if n == 1:
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
            return
        exact = model(**wrapper.model_inputs(x, thumbnails=wrapper.processor_thumbnail(image))).logits[:, -1]
    torch.testing.assert_close(exact, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference, atol=THUMBNAIL_BOUND, rtol=0)


def test_layout_follows_the_processor_and_bad_inputs_are_refused(tiny):
    """Tile grids and image-token counts for five aspect ratios; canvases that no tiling makes, a thumbnail for a
    one-tile canvas and raw pixels are refused with what to do."""
    _, processor, _ = tiny
    wrapper = wrap(tiny)
    for size, tiles in TILINGS.items():
        x = wrapper.preprocess(random_image(*size))
        layout = wrapper.layout_for(*x.shape[2:])
        n = tiles[0] * tiles[1]
        assert layout.tiles == tiles and layout.thumbnail == (n > 1)
        assert len(layout.tile_positions) == n * G * G and len(layout.thumbnail_positions) == (n > 1) * G * G
        ids = layout.text_inputs["input_ids"][0]
        first = int(layout.image_positions[0])
        assert int(ids[first - 1]) == processor.start_image_token_id
        assert int(ids[int(layout.image_positions[-1]) + 1]) == processor.end_image_token_id
        assert torch.equal(layout.image_positions, torch.arange(first, first + (n + (n > 1)) * G * G))
    with pytest.raises(ValueError, match=r"not a canvas of 1 to 6 whole 32-pixel tiles.*preprocess"):
        wrapper(torch.zeros(1, 3, 40, 32))
    with pytest.raises(ValueError, match="not a canvas of 1 to 6"):
        wrapper(torch.zeros(1, 3, 32, 7 * S))
    with pytest.raises(ValueError, match="raw 0..255 pixels"):
        wrapper(torch.full((1, 3, S, S), 200.0))
    with pytest.raises(ValueError, match="one-tile canvas has no thumbnail"):
        wrapper.model_inputs(torch.zeros(1, 3, S, S), thumbnails=torch.zeros(1, 3, S, S))
    with pytest.raises(ValueError, match="fits one tile"):
        wrapper.processor_thumbnail(random_image(30, 30))
    with pytest.raises(ValueError, match="view must be one of"):
        wrap(tiny, view="base")
    with pytest.raises(ValueError, match="question alone"):
        InternVLWrapper(tiny[0], processor, prompt="<IMG_CONTEXT> What?")


def test_answer_score_equals_processor_path(tiny):
    model, processor, _ = tiny
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
    torch.testing.assert_close(score[0, 0], expected, atol=THUMBNAIL_BOUND, rtol=0)


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


@pytest.mark.parametrize("where", ["decoder", "projector", "vision"])
def test_one_changed_cell_moves_its_own_cell_most(tiny, where):
    """View "tiles" on a 2x2 canvas: change one cell of the input (a token's 8 px for decoder layer 0 and the
    projector, a patch's 4 px for vision block 0), on every tile, and the map's largest change lands on that cell."""
    wrapper = wrap(tiny, view="tiles")
    x = wrapper.preprocess(random_image(60, 60, seed=5))
    layer, cell = {"decoder": (wrapper.decoder_layers[0], S // G), "projector": (wrapper.projector, S // G),
                   "vision": (wrapper.vision_blocks[0], S // P)}[where]
    side = 2 * S // cell
    cells = [(r, c) for r in range(side) for c in range(side)]
    change = change_maps(wrapper, layer, x, [(cell * r, cell * r + cell, cell * c, cell * c + cell) for r, c in cells])
    assert change.shape[1:] == (side, side)
    assert [divmod(int(i), side) for i in change.flatten(1).argmax(1)] == cells


@pytest.mark.parametrize("size", [(60, 60), (40, 70)], ids=["2x2", "1x2"])
def test_one_changed_thumbnail_cell_moves_its_own_cell_most(tiny, size):
    """View "thumbnail", decoder layer 0: change the part of the canvas that one thumbnail token covers (the canvas
    cut in 4x4) and the largest change of the thumbnail map, resized onto the canvas grid, lies over that part."""
    wrapper = wrap(tiny, view="thumbnail")
    x = wrapper.preprocess(random_image(*size, seed=7))
    height, width = x.shape[2:]
    cells = [(i, j) for i in range(G) for j in range(G)]
    regions = [(height * i // G, height * (i + 1) // G, width * j // G, width * (j + 1) // G) for i, j in cells]
    change = change_maps(wrapper, wrapper.decoder_layers[0], x, regions)
    grid_h, grid_w = change.shape[1:]
    peaks = [divmod(int(k), grid_w) for k in change.flatten(1).argmax(1)]
    landed = [(r * G // grid_h, c * G // grid_w) for r, c in peaks]
    assert landed == cells


# ------------------------------------------------------------------------------------------- Grad-CAM by hand
@pytest.mark.parametrize("view", ["tiles", "thumbnail", "combined"])
def test_decoder_gradcam_equals_direct_computation(tiny, view):
    """Grad-CAM of decoder layer 1 by hand on the raw model with hooks (the processor's inputs, with the thumbnail
    the wrapper resizes from the canvas), the image tokens placed on the canvas by hand. "combined" is the ReLU of
    the sum of the tile and thumbnail maps before their ReLU, each with its own channel weights."""
    model, processor, _ = tiny
    image = random_image(40, 70, seed=8)
    wrapper = wrap(tiny, view=view)
    x = wrapper.preprocess(image)
    inputs = processor_inputs_with_wrapper_thumbnail(wrapper, processor, image, x)
    hidden, grad, target = hidden_and_grad(model, inputs, model.model.language_model.layers[1])
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    (a_tiles, a_thumb), (g_tiles, g_thumb) = (views_by_hand(t[0, positions].reshape(3, G, G, -1).permute(0, 3, 1, 2),
                                                            (1, 2)) for t in (hidden, grad))
    cam_tiles, cam_thumb = gradcam_by_hand(a_tiles, g_tiles), gradcam_by_hand(a_thumb, g_thumb)
    cam = torch.relu({"tiles": cam_tiles, "thumbnail": cam_thumb, "combined": cam_tiles + cam_thumb}[view])
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam_method:
        maps = cam_method(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    assert maps.shape == (1,) + tuple(x.shape[2:]) and maps.max() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(maps, pipeline(cam.numpy(), x), atol=1e-4)


@pytest.mark.parametrize("where", ["vision", "projector"])
def test_vision_gradcam_equals_direct_computation_with_and_without_graph_start(tiny, where):
    """Vision block 1 (class token dropped, 8x8 patches per tile) and the projector (4x4 tokens per tile), view
    "combined", on a 2x1 canvas: by hand on the raw model, each image's rows put on the canvas. Equal with the graph
    started at the layer and with the whole graph."""
    model, processor, _ = tiny
    image = random_image(70, 40, seed=9)
    probe = wrap(tiny)
    x = probe.preprocess(image)
    inputs = processor_inputs_with_wrapper_thumbnail(probe, processor, image, x)
    layer = probe.vision_blocks[1] if where == "vision" else probe.projector
    hidden, grad, target = hidden_and_grad(model, inputs, layer)
    n = P if where == "vision" else G

    def grids(rows):  # (images, [CLS +] n * n, C) -> (images, C, n, n)
        return rows[:, rows.shape[1] - n * n:].reshape(3, n, n, -1).permute(0, 3, 1, 2)

    (a_tiles, a_thumb), (g_tiles, g_thumb) = views_by_hand(grids(hidden), (2, 1)), views_by_hand(grids(grad), (2, 1))
    cam = torch.relu(gradcam_by_hand(a_tiles, g_tiles) + gradcam_by_hand(a_thumb, g_thumb))
    expected = pipeline(cam.numpy(), x)
    for efficient in (True, False):
        wrapper = wrap(tiny, efficient_gradients=efficient)
        target_layer = wrapper.vision_blocks[1] if where == "vision" else wrapper.projector
        with GradCAM(model=wrapper, target_layers=[target_layer], reshape_transform=wrapper.reshape_transform) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
        model.zero_grad(set_to_none=True)  # without efficient gradients, grad-cam's backward fills weight gradients
        np.testing.assert_allclose(maps, expected, atol=1e-5, err_msg=f"efficient_gradients={efficient}")


def test_one_tile_canvas_draws_its_tile_under_every_view(tiny):
    """A 1x1 canvas has no thumbnail: GradCAM of decoder layer 1 is the same map under every view, equal to the
    one tile's Grad-CAM by hand."""
    model, processor, _ = tiny
    image = random_image(30, 30, seed=10)
    x = wrap(tiny).preprocess(image)
    inputs = chat_inputs(processor, image)
    hidden, grad, target = hidden_and_grad(model, inputs, model.model.language_model.layers[1])
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    grid_a, grid_g = (t[0, positions].T.reshape(-1, G, G) for t in (hidden, grad))
    expected = pipeline(torch.relu(gradcam_by_hand(grid_a, grid_g)).numpy(), x)
    for view in ("tiles", "thumbnail", "combined"):
        wrapper = wrap(tiny, view=view)
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            np.testing.assert_allclose(cam(input_tensor=x, targets=[ClassifierOutputTarget(target)]), expected,
                                       atol=1e-4, err_msg=view)


def test_last_decoder_layer_warns_and_names_working_ones(tiny):
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(40, 70))
    with pytest.warns(UserWarning, match=r"decoder_layers\[-2\] \(layer 2\)"):
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[-1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            assert cam(input_tensor=x, targets=None).max() == 0


def test_attention_map_equals_output_attentions(tiny):
    """AttentionMap on decoder layer 1, under each view of a 2x1 canvas, equals the last position's head-mean
    attention to the image tokens, read from output_attentions (the processor's inputs, with the thumbnail the
    wrapper resizes) and placed on the canvas by hand ("combined": tiles' plus thumbnail's); token_geometry names the
    thumbnail's tokens. AttentionRollout over the decoder layers: maps of the input size, not constant."""
    model, processor, _ = tiny
    image = random_image(70, 40, seed=11)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    inputs = processor_inputs_with_wrapper_thumbnail(wrapper, processor, image, x)
    with wrapper.eager_attention(), torch.no_grad():
        row = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    tiles, thumbnail = views_by_hand(row[positions].reshape(3, 1, G, G), (2, 1))
    for view, expected in (("tiles", tiles), ("thumbnail", thumbnail), ("combined", tiles + thumbnail)):
        wrapper.view = view
        with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[1]]) as cam:
            maps = cam(input_tensor=x, targets=None)
        assert maps.shape == (1,) + tuple(x.shape[2:])
        np.testing.assert_allclose(maps, pipeline(expected[0].numpy(), x), atol=1e-5, err_msg=view)
    assert torch.equal(wrapper.token_geometry()[1], positions[2 * G * G:])
    with AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers) as cam:
        rollout = cam(input_tensor=torch.cat([x, x.flip(3)]), targets=None)
    assert rollout.shape == (2,) + tuple(x.shape[2:]) and rollout.max(axis=(1, 2)) == pytest.approx([1, 1], abs=1e-5)
    assert all(np.ptp(m) > 0.1 for m in rollout)


# ------------------------------------------------------------------------------------------- methods and state
@pytest.mark.parametrize("method", VLM_METHODS, ids=lambda m: m.__name__)
def test_every_method_runs_at_batch_1_and_2(tiny, method):
    """README's method table: each method on decoder layer 0 at batch 2 (view "combined": 2C channels) and on
    vision block 1 at batch 1 (AblationCAM: decoder layers only, refused on a vision block with the model intact).
    HiResCAM and LayerCAM blank out one sample of this random model under "combined", whose thumbnail contributions
    are negative everywhere there."""
    model, _, _ = tiny
    wrapper = wrap(tiny)
    check_method_on_decoder_and_vision(method, model, wrapper, wrapper.preprocess(random_image(40, 70, seed=10)),
                                       wrapper.decoder_layers[0], "vision blocks and the projector are not supported")


def test_fullgrad_raises_its_documented_error(tiny):
    wrapper = wrap(tiny)
    assert_fullgrad_refused(wrapper, wrapper.preprocess(random_image(40, 70)))


def test_the_projector_is_an_explain_candidate(tiny):
    wrapper = wrap(tiny)
    assert_projector_candidate(wrapper, wrapper.projector, wrapper.preprocess(random_image(40, 70)))


def test_model_state_restored_after_call_and_after_exception(tiny):
    model, _, _ = tiny
    with partly_frozen_in_train_mode(model, model.model.vision_tower):
        wrapper = wrap(tiny)
        layers = [wrapper.decoder_layers[0], wrapper.vision_blocks[1], wrapper.projector]
        before = assert_state_kept_through_gradcam(model, wrapper, wrapper.preprocess(random_image(40, 70)), layers)
        with pytest.raises(ValueError, match="not a canvas"):
            with GradCAM(model=wrapper, target_layers=layers, reshape_transform=wrapper.reshape_transform) as cam:
                cam(input_tensor=torch.zeros(1, 3, 48, 48), targets=None)
        assert model_state(model) == before
# ------------------------------------------------------------------------------------------- auto, registry and CLI
def test_explain_returns_a_map_of_the_input_size(tiny):
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(100, 30, seed=12))
    result = explain(wrapper, x)
    assert result.maps.shape == (1,) + tuple(x.shape[2:]) and result.maps.dtype == np.float32
    assert result.candidate_layers == ["projector", 0, 1, 2] and result.methods[0] in AUTO_METHODS
    m, l = result.candidate_methods.index(result.methods[0]), result.candidate_layers.index(result.layers[0])
    np.testing.assert_array_equal(result.maps[0], result.candidate_maps[0, m, l])


def test_cli_explain_writes_maps_and_report(tiny, tmp_path, capsys):
    _, _, folder = tiny
    Image.fromarray(random_image(70, 40, seed=13)).save(tmp_path / "image.png")
    x = check_cli_explain(folder, "internvl", InternVLWrapper, tmp_path / "image.png", tmp_path, capsys)
    assert x.shape == (1, 3, 2 * S, S)
