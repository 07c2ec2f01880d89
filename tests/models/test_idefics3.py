"""Idefics3Wrapper on tiny SmolVLM (model type "smolvlm") and Idefics3 models: QwenVLWrapper's contract, checked
against the processor path, the processor's token layout, perturbations of single cells and hand-made Grad-CAM."""
import copy

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
from pytorch_grad_cam_vlm import AttentionMap, AttentionRollout, Idefics3Wrapper, build_tiny_idefics3, explain
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS

FAMILIES = ["smolvlm", "idefics3"]
TILE, PATCH = 32, 4  # the tiny models' tiles and patches (models/tiny/idefics3.py)
SCALE = {"smolvlm": 2, "idefics3": 4}  # their pixel-shuffle factors: 4x4 tokens of 8 px, 2x2 tokens of 16 px
# The next-token logits of the wrapper (global image resized from the canvas in torch) and of the processor (the
# same resize on uint8 pixels, rounded) differ by at most this on pictures of shapes; measured 2.0e-4 over 40 such
# pictures of 10 sizes (1.2e-3 on random noise), with logits of standard deviation ~0.16 (see models/idefics3.py).
GLOBAL_IMAGE_BOUND = 1e-3


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, model, processor, folder) of a tiny random model saved and loaded back."""
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model, processor = build_tiny_idefics3(folder, family=request.param, seed=0)
    return request.param, model, processor, str(folder)


def wrap(tiny, **kwargs):
    return Idefics3Wrapper(tiny[1], tiny[2], prompt=PROMPT, **kwargs)


def side(family):
    """Tokens per side of one image."""
    return TILE // PATCH // SCALE[family]


def shapes_image(height, width, seed=0):
    """A picture of three filled discs on a plain background."""
    rs = np.random.RandomState(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rs.randint(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y, r = rs.randint(0, width), rs.randint(0, height), rs.randint(3, max(4, min(height, width) // 2))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rs.randint(0, 255, 3)))
    return np.asarray(image).copy()


def positions_by_hand(input_ids, tokenizer, rows, cols, n):
    """The image-token positions read off the processor's prompt: the n tokens after each tile's <row_i_col_j>
    marker in raster order, then the n after <global-img>."""
    ids = input_ids.tolist()
    markers = [f"<row_{i + 1}_col_{j + 1}>" for i in range(rows) for j in range(cols)] + ["<global-img>"]
    starts = [ids.index(tokenizer.convert_tokens_to_ids(m)) + 1 for m in markers]
    return torch.tensor([s + k for s in starts for k in range(n)])


def views_by_hand(tokens, rows, cols, g):
    """(images * g * g, C) rows of the tiles (raster order) and the global image, by hand: the tiles' g x g grids side
    by side on the canvas grid, and the global grid resized (bilinear) over the same canvas grid."""
    channels = tokens.shape[1]
    per_image = tokens.reshape(rows * cols + 1, g * g, channels)
    tiles = torch.zeros(channels, rows * g, cols * g)
    for k in range(rows * cols):
        i, j = divmod(k, cols)
        tiles[:, i * g:(i + 1) * g, j * g:(j + 1) * g] = per_image[k].T.reshape(channels, g, g)
    whole = per_image[-1].T.reshape(1, channels, g, g)
    return tiles, F.interpolate(whole, size=(rows * g, cols * g), mode="bilinear", align_corners=False)[0]


def gradcam_by_hand(activations, grads):
    """Grad-CAM before its ReLU of one image's (C, h, w) activations and gradients."""
    return (activations * grads.mean((1, 2))[:, None, None]).sum(0)


def pipeline(cam, x):
    """grad-cam's post-processing of one layer's map: scale to [0, 1] and resize, then scale the layer mean again."""
    return scale_cam_image(scale_cam_image(cam[None], (x.shape[3], x.shape[2])))


def wrapper_inputs(wrapper, image, x):
    """The processor's inputs for ``image`` with the global image the wrapper resizes from the canvas ``x``."""
    inputs = chat_inputs(wrapper.processor, image)
    inputs["pixel_values"][:, -1] = wrapper.global_image(x)[0]
    return inputs


# ------------------------------------------------------------------------------------------- inputs and logits
@pytest.mark.parametrize("size", [(40, 70), (100, 30), (20, 20), (50, 200)])
def test_logits_equal_processor_path(tiny, size):
    """The canvas's tiles are exactly the processor's, and so are the prompt's tokens; with the processor's own
    global image the logits agree to 1e-5, with the global image resized from the canvas in torch (what forward does)
    to GLOBAL_IMAGE_BOUND. Sizes: 2x3, 3x1, 3x3 (an upscaled picture) and 1x3 tiles."""
    family, model, processor, _ = tiny
    image = shapes_image(*size, seed=1)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    inputs = chat_inputs(processor, image)
    rows, cols = x.shape[2] // TILE, x.shape[3] // TILE
    assert (rows, cols) == {(40, 70): (2, 3), (100, 30): (3, 1), (20, 20): (3, 3), (50, 200): (1, 3)}[size]
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        logits = wrapper(x)
        built = wrapper.model_inputs(x)
        exact = model(**wrapper.model_inputs(x, global_images=wrapper.processor_global_image(image))).logits[:, -1]
    assert logits.dtype == torch.float32 and logits.shape == reference.shape == (1, len(processor.tokenizer))
    assert built["pixel_values"].shape == inputs["pixel_values"].shape == (1, rows * cols + 1, 3, TILE, TILE)
    assert torch.equal(built["pixel_values"][:, :-1], inputs["pixel_values"][:, :-1])
    assert torch.equal(built["input_ids"], inputs["input_ids"])
    # the global image: the processor's resize of the uint8 canvas, to within its rounding (1 level = 1/255/0.5)
    assert (built["pixel_values"][0, -1] - inputs["pixel_values"][0, -1]).abs().max() <= 1.05 / 255 / 0.5
    torch.testing.assert_close(exact, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference, atol=GLOBAL_IMAGE_BOUND, rtol=0)


def test_token_positions_equal_the_processors_layout(tiny):
    """Each tile's tokens follow its <row_i_col_j> marker and the global image's follow <global-img>, as read off
    the processor's prompt; inputs that are not a canvas of this processor are refused."""
    family, _, processor, _ = tiny
    wrapper = wrap(tiny)
    n = side(family) ** 2
    for size in [(40, 70), (100, 30), (20, 20)]:
        image = random_image(*size)
        x = wrapper.preprocess(image)
        layout = wrapper.layout_for(*x.shape[2:])
        rows, cols = layout.tiles
        expected = positions_by_hand(chat_inputs(processor, image)["input_ids"][0], processor.tokenizer, rows, cols, n)
        assert torch.equal(layout.image_positions, expected) and len(expected) == (rows * cols + 1) * n
        assert torch.equal(layout.global_positions, expected[-n:])
    with pytest.raises(ValueError, match="not a canvas of this processor.*3x3 tiles"):
        wrapper(torch.zeros(1, 3, 64, 64))  # a 64x64 picture becomes 96x96: 3x3 tiles
    with pytest.raises(ValueError, match="raw 0..255 pixels"):
        wrapper(torch.full((1, 3, 64, 96), 200.0))


def test_unsplit_picture_is_one_image(tiny):
    """Without image splitting the processor makes one tile-sized image after <global-img>: the wrapper's input is
    that image, its logits equal the processor path's to 1e-5 and every view maps its g x g tokens."""
    family, model, processor, _ = tiny
    processor = copy.deepcopy(processor)
    processor.image_processor.do_image_splitting = False
    image = shapes_image(40, 70, seed=2)
    wrapper = Idefics3Wrapper(model, processor, prompt=PROMPT, view="tiles")
    x = wrapper.preprocess(image)
    inputs = chat_inputs(processor, image)
    assert x.shape == (1, 3, TILE, TILE) and torch.equal(x, inputs["pixel_values"][:, 0])
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), model(**inputs).logits[:, -1], atol=1e-5, rtol=0)
    layout = wrapper.layout
    g = side(family)
    assert layout.tiles == (0, 0)
    assert torch.equal(layout.image_positions, positions_by_hand(inputs["input_ids"][0], processor.tokenizer, 0, 0,
                                                                 g * g))
    hidden = torch.randn(1, layout.sequence_length, 8)
    expected = hidden[0, layout.image_positions].T.reshape(8, g, g)
    for view in ("tiles", "global", "combined"):
        wrapper.view = view
        assert torch.equal(wrapper.reshape_transform(hidden)[0], expected)
    with pytest.raises(ValueError, match="not split into tiles"):
        wrapper.processor_global_image(image)


def test_mismatched_inputs_are_refused_with_what_to_do(tiny):
    family, model, processor, _ = tiny
    with pytest.raises(ValueError, match="Pass the question alone"):
        Idefics3Wrapper(model, processor, prompt="<image> What is it?")
    other = copy.deepcopy(processor)
    other.image_seq_len = 9
    with pytest.raises(ValueError, match="puts 9 image tokens per 32 px tile.*from one checkpoint"):
        Idefics3Wrapper(model, other, prompt=PROMPT)
    llava = torch.nn.Module()
    llava.config = copy.copy(model.config)
    llava.config.model_type = "llava"
    with pytest.raises(ValueError, match="supports model types idefics3, smolvlm, got 'llava'"):
        Idefics3Wrapper(llava, processor, prompt=PROMPT)


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
    torch.testing.assert_close(score[0, 0], expected, atol=GLOBAL_IMAGE_BOUND, rtol=0)


def test_a_tile_of_zeros_is_kept(tiny):
    """The model drops images that are all 0 (batch padding), which would break the token count; the wrapper keeps
    a zero tile (a normalised grey, a ScoreCAM mask): its logits equal those of a tile of 1e-6."""
    family, model, processor, _ = tiny
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(40, 70, seed=4))
    zero, small = x.clone(), x.clone()
    zero[:, :, :TILE, :TILE], small[:, :, :TILE, :TILE] = 0, 1e-6
    with torch.no_grad():
        torch.testing.assert_close(wrapper(zero), wrapper(small), atol=1e-5, rtol=0)
        raw = wrapper.model_inputs(zero)
        raw["pixel_values"][:, 0] = 0
        # transformers >= 5.2x says image features and tokens "do not match"; 5.13 fails while indexing them
        with pytest.raises((ValueError, IndexError, RuntimeError)):
            model(**raw)


# ------------------------------------------------------------------------------------------- the grid
def change_of(layer, wrapper, x, regions, read):
    """The norm over channels (axis 1) of the change of ``read(output)`` of ``layer`` when each region (y0, y1, x0,
    x1) of ``x`` is raised by 1 (all in one batch): ``(regions, ...)``."""
    batch = x.repeat(len(regions) + 1, 1, 1, 1)
    for k, (y0, y1, x0, x1) in enumerate(regions):
        batch[k + 1, :, y0:y1, x0:x1] += 1.0
    store = {}
    handle = layer.register_forward_hook(lambda m, a, o: store.__setitem__("out", read(o)))
    with torch.no_grad():
        wrapper(batch)
    handle.remove()
    return (store["out"][1:] - store["out"][:1]).norm(dim=1)


def test_one_changed_cell_moves_its_own_tile_cell_most(tiny):
    """Decoder layer 0, view "tiles": change one token cell (patch x scale_factor pixels) of the canvas, for every
    cell of every tile of a 2x3 canvas, and the map's largest change lands on that cell."""
    family, _, _, _ = tiny
    wrapper = wrap(tiny, view="tiles")
    x = wrapper.preprocess(random_image(40, 70, seed=5))
    c = wrapper.token_cell
    assert c == PATCH * SCALE[family]
    cells = [(r, k) for r in range(x.shape[2] // c) for k in range(x.shape[3] // c)]
    change = change_of(wrapper.decoder_layers[0], wrapper, x, [(c * r, c * r + c, c * k, c * k + c) for r, k in cells],
                       wrapper.reshape_transform)
    width = change.shape[2]
    assert change.shape[1:] == (x.shape[2] // c, width) == (x.shape[2] // c, x.shape[3] // c)
    assert [divmod(int(i), width) for i in change.flatten(1).argmax(1)] == cells


def test_one_changed_global_cell_moves_its_own_global_token_most(tiny):
    """Decoder layer 0: change the part of the canvas one global-image token covers (the canvas cut in g x g) and
    the largest change among the global image's tokens is that token's."""
    family, _, _, _ = tiny
    wrapper = wrap(tiny, view="global")
    x = wrapper.preprocess(random_image(40, 70, seed=6))
    g, (height, width) = side(family), x.shape[2:]
    cells = [(i, j) for i in range(g) for j in range(g)]
    regions = [(height * i // g, height * (i + 1) // g, width * j // g, width * (j + 1) // g) for i, j in cells]
    layout = wrapper.layout_for(height, width)
    change = change_of(wrapper.decoder_layers[0], wrapper, x, regions,
                       lambda o: o[:, layout.global_positions].transpose(1, 2))
    assert [divmod(int(i), g) for i in change.argmax(1)] == cells


# ------------------------------------------------------------------------------------------- Grad-CAM by hand
@pytest.mark.parametrize("view", ["tiles", "global", "combined"])
def test_decoder_gradcam_equals_direct_computation(tiny, view):
    """Grad-CAM of decoder layer 1 by hand on the raw model with hooks (the processor's inputs with the global image
    the wrapper resizes), the image tokens found by their markers and placed on the canvas grid by hand. "combined"
    is the ReLU of the sum of the tile and global maps before their ReLU, each with its own channel weights."""
    family, model, processor, _ = tiny
    image = random_image(40, 70, seed=8)
    wrapper = wrap(tiny, view=view)
    x = wrapper.preprocess(image)
    inputs = wrapper_inputs(wrapper, image, x)
    hidden, grad, target = hidden_and_grad(model, inputs, model.model.text_model.layers[1])
    g = side(family)
    positions = positions_by_hand(inputs["input_ids"][0], processor.tokenizer, 2, 3, g * g)
    (a_tiles, a_global), (g_tiles, g_global) = (views_by_hand(t[0, positions], 2, 3, g) for t in (hidden, grad))
    cam_tiles, cam_global = gradcam_by_hand(a_tiles, g_tiles), gradcam_by_hand(a_global, g_global)
    cam = torch.relu({"tiles": cam_tiles, "global": cam_global, "combined": cam_tiles + cam_global}[view])
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam_method:
        maps = cam_method(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    assert maps.shape == (1,) + tuple(x.shape[2:]) and maps.max() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(maps, pipeline(cam.numpy(), x), atol=1e-4)


@pytest.mark.parametrize("where", ["vision block 1", "connector"])
def test_vision_gradcam_equals_direct_computation_with_and_without_graph_start(tiny, where):
    """Vision block 1 ((images, 8x8 patches, C)) and the connector ((images, g x g tokens, C)) by hand on the raw
    model, view "combined": the tiles' grids side by side and the global grid resized over them. Equal with the
    graph started at the layer and with the whole graph."""
    family, model, processor, _ = tiny
    image = random_image(100, 30, seed=9)
    probe = wrap(tiny)
    x = probe.preprocess(image)
    inputs = wrapper_inputs(probe, image, x)
    layer = model.model.vision_model.encoder.layers[1] if where != "connector" else model.model.connector
    hidden, grad, target = hidden_and_grad(model, inputs, layer)
    n = hidden.shape[1]
    assert n == {"connector": side(family) ** 2}.get(where, (TILE // PATCH) ** 2)
    grid = int(n ** 0.5)
    (a_tiles, a_global), (g_tiles, g_global) = (views_by_hand(t.flatten(0, 1), 3, 1, grid) for t in (hidden, grad))
    cam = torch.relu(gradcam_by_hand(a_tiles, g_tiles) + gradcam_by_hand(a_global, g_global))
    expected = pipeline(cam.numpy(), x)
    for efficient in (True, False):
        wrapper = wrap(tiny, efficient_gradients=efficient)
        target_layer = wrapper.connector if where == "connector" else wrapper.vision_blocks[1]
        with GradCAM(model=wrapper, target_layers=[target_layer], reshape_transform=wrapper.reshape_transform) as cam_:
            maps = cam_(input_tensor=x, targets=[ClassifierOutputTarget(target)])
        model.zero_grad(set_to_none=True)  # without efficient gradients, grad-cam's backward fills weight gradients
        np.testing.assert_allclose(maps, expected, atol=1e-5, err_msg=f"efficient_gradients={efficient}")


def test_last_decoder_layer_is_blank_and_warns(tiny):
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(40, 70))
    with pytest.warns(UserWarning, match=r"decoder_layers\[-2\] \(layer 2\)"):
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[-1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            assert cam(input_tensor=x, targets=None).max() == 0


# ------------------------------------------------------------------------------------------- attention
def test_attention_map_equals_output_attentions(tiny):
    """AttentionMap on decoder layer 1, under each view of a 2x3 canvas, equals the last position's head-mean
    attention to the image tokens, read from output_attentions (the processor's inputs, with the global image the
    wrapper resizes), the tokens found by their markers and placed on the canvas grid by hand ("combined": tiles'
    plus global's). token_geometry names the global image's tokens. AttentionRollout over the decoder layers: maps of
    the input size, not constant."""
    family, model, processor, _ = tiny
    image = random_image(40, 70, seed=11)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    inputs = wrapper_inputs(wrapper, image, x)
    with wrapper.eager_attention(), torch.no_grad():
        row = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)
    g = side(family)
    positions = positions_by_hand(inputs["input_ids"][0], processor.tokenizer, 2, 3, g * g)
    tiles, whole = views_by_hand(row[positions][:, None], 2, 3, g)
    for view, expected in (("tiles", tiles), ("global", whole), ("combined", tiles + whole)):
        wrapper.view = view
        with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[1]]) as cam:
            maps = cam(input_tensor=x, targets=None)
        assert maps.shape == (1,) + tuple(x.shape[2:])
        np.testing.assert_allclose(maps, pipeline(expected[0].numpy(), x), atol=1e-5, err_msg=view)
    assert torch.equal(wrapper.token_geometry()[1], positions[-g * g:])
    with AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers) as cam:
        rollout = cam(input_tensor=torch.cat([x, x.flip(3)]), targets=None)
    assert rollout.shape == (2,) + tuple(x.shape[2:]) and rollout.max(axis=(1, 2)) == pytest.approx([1, 1], abs=1e-5)
    assert all(np.ptp(m) > 0.1 for m in rollout)


# ------------------------------------------------------------------------------------------- methods and state
@pytest.mark.parametrize("method", VLM_METHODS, ids=lambda m: m.__name__)
def test_every_method_runs_at_batch_1_and_2(tiny, method):
    """README's method table: each method on decoder layer 0 at batch 2 (view "combined": 2C channels) and on
    vision block 1 at batch 1 (AblationCAM: decoder layers only, refused on a vision block with the model intact)."""
    family, model, processor, _ = tiny
    wrapper = wrap(tiny)
    check_method_on_decoder_and_vision(method, model, wrapper, wrapper.preprocess(random_image(100, 30, seed=10)),
                                       wrapper.decoder_layers[0], "vision blocks and the projector are not supported")


def test_fullgrad_raises_its_documented_error(tiny):
    wrapper = wrap(tiny)
    assert_fullgrad_refused(wrapper, wrapper.preprocess(random_image(40, 70)))


def test_the_projector_is_an_explain_candidate(tiny):
    wrapper = wrap(tiny)
    assert_projector_candidate(wrapper, wrapper.connector, wrapper.preprocess(random_image(40, 70)))


def test_model_state_restored_after_call_and_after_exception(tiny):
    family, model, processor, _ = tiny
    with partly_frozen_in_train_mode(model, model.model.vision_model):
        wrapper = wrap(tiny)
        layers = [wrapper.decoder_layers[0], wrapper.vision_blocks[1], wrapper.connector]
        before = assert_state_kept_through_gradcam(model, wrapper, wrapper.preprocess(random_image(40, 70)), layers)
        with pytest.raises(ValueError, match="view must be one of"):
            wrap(tiny, view="base")
        assert model_state(model) == before
# ------------------------------------------------------------------------------------------- auto and CLI
def test_explain_returns_a_map_of_the_input_size(tiny):
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(100, 30, seed=12))
    result = explain(wrapper, x)
    assert result.maps.shape == (1,) + tuple(x.shape[2:]) and result.maps.dtype == np.float32
    assert result.candidate_layers == ["projector", 0, 1, 2] and result.methods[0] in AUTO_METHODS
    m, l = result.candidate_methods.index(result.methods[0]), result.candidate_layers.index(result.layers[0])
    np.testing.assert_array_equal(result.maps[0], result.candidate_maps[0, m, l])


def test_cli_explain_writes_maps_and_report(tiny, tmp_path, capsys):
    family, _, _, folder = tiny
    Image.fromarray(random_image(70, 40, seed=13)).save(tmp_path / "image.png")
    x = check_cli_explain(folder, family, Idefics3Wrapper, tmp_path / "image.png", tmp_path, capsys)
    assert x.shape == (1, 3, 3 * TILE, 2 * TILE)
