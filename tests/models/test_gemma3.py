"""Gemma3Wrapper on a tiny Gemma 3 model: QwenVLWrapper's contract, checked against the processor path (with and
without pan-and-scan), perturbations of single cells of each crop and of the whole image, and hand-made Grad-CAM."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import (PROMPT, VLM_METHODS, assert_fullgrad_refused, assert_projector_candidate,
                      assert_state_kept_through_gradcam, check_cli_explain, check_method_on_decoder_and_vision,
                      hidden_and_grad, model_state, partly_frozen_in_train_mode, random_image)
from test_llava import change_maps, gradcam_by_hand, pipeline, shapes_image
from pytorch_grad_cam_vlm import AttentionMap, AttentionRollout, Gemma3Wrapper, build_tiny_gemma3, explain
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS

G = 4  # tokens per side of one image: 8x8 patches of 4 px pooled by 2, one token per 8-pixel cell
P = 8  # patches per side
S = 32  # the encoder's image size
# The next-token logits of the wrapper (whole image resized from the canvas in torch) and of the processor (whole
# image resized from the picture) with pan-and-scan crops differ by at most this; measured 2.1e-3 (model seed 1) and
# 9e-4 (seed 0) over 15 pictures of discs in 5 sizes of 2 to 4 crops, with logits of standard deviation ~0.16.
WHOLE_IMAGE_BOUND = 5e-3
LANDSCAPE = (260, 600)  # 2 crops of 260x300 with the processor's defaults (crops of at least 256 px)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, processor, folder) of a tiny random Gemma 3 saved and loaded back (see models/tiny/gemma3.py). Seed 1
    (seed 2 passes too): on random weights, methods with positive channel weights (GradCAM++, ScoreCAM, LayerCAM, FEM)
    give blank maps where the activations' channel mean is negative almost everywhere (seeds 0, 3, 5, 6 on these
    pictures), and at seed 4 one decoder token changes more than the changed cell's whatever cell is changed."""
    folder = tmp_path_factory.mktemp("tiny_gemma3")
    model, processor = build_tiny_gemma3(folder, seed=1)
    return model, processor, str(folder)


def wrap(tiny, **kwargs):
    return Gemma3Wrapper(tiny[0], tiny[1], prompt=PROMPT, **kwargs)


def processor_inputs(processor, image, pan_and_scan):
    """The reference path: the processor's chat template, tokenized with the image (one <bos>, token_type_ids)."""
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                             {"type": "text", "text": PROMPT}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", processor_kwargs={"do_pan_and_scan": pan_and_scan})


def by_hand_inputs(wrapper, image, x):
    """The processor's inputs, the whole image replaced by the one the wrapper resizes from the canvas."""
    inputs = processor_inputs(wrapper.processor, image, True)
    inputs["pixel_values"][0] = wrapper.model_inputs(x)["pixel_values"][0]
    return inputs


def views_by_hand(rows, side, crops, view):
    """(images, side*side, C) rows of the whole image and its crops in a row (landscape) to the view's (C', h, w)
    grid: each crop's grid at its columns, the whole grid resized (bilinear) onto the same grid."""
    grids = rows.transpose(1, 2).reshape(len(rows), -1, side, side)
    tiled = torch.cat(list(grids[1:1 + crops]), dim=2)
    whole = F.interpolate(grids[:1], size=tiled.shape[1:], mode="bilinear", align_corners=False)[0]
    return {"crops": tiled, "whole": whole, "combined": torch.cat([tiled, whole])}[view]


# ------------------------------------------------------------------------------------------- inputs and logits
@pytest.mark.parametrize("pan_and_scan,size", [(False, (48, 48)), (False, (40, 70)), (False, (700, 300)),
                                               (True, (300, 330)), (True, LANDSCAPE), (True, (1100, 280)),
                                               (True, (260, 1030))])
def test_logits_equal_processor_path(tiny, pan_and_scan, size):
    """One square image: the processor's pixel values, logits to 1e-5. Pan-and-scan (none for a near-square picture;
    2 crops; 4 crops portrait; 4 crops landscape, the last one 2 px narrower): the canvas's crops, input_ids and
    token_type_ids are exactly the processor's; with the processor's own whole image the logits agree to 1e-5, with
    the whole image resized from the canvas in torch (what forward does) to WHOLE_IMAGE_BOUND."""
    model, processor, _ = tiny
    image = shapes_image(*size, seed=1)
    wrapper = wrap(tiny, pan_and_scan=pan_and_scan)
    x = wrapper.preprocess(image)
    inputs = processor_inputs(processor, image, pan_and_scan)
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        logits = wrapper(x)
        built = wrapper.model_inputs(x)
        assert logits.dtype == torch.float32 and logits.shape == reference.shape == (1, len(processor.tokenizer))
        assert list(inputs["input_ids"][0]).count(processor.tokenizer.bos_token_id) == 1
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(built[key], inputs[key]), key
        assert torch.equal(built["pixel_values"][-1:], inputs["pixel_values"][-1:])
        if len(inputs["pixel_values"]) == 1:
            assert torch.equal(x, inputs["pixel_values"]) and x.shape == (1, 3, S, S)
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
            return
        assert torch.equal(built["pixel_values"][1:], inputs["pixel_values"][1:])
        exact = model(**wrapper.model_inputs(x, whole_images=wrapper.processor_whole_image(image))).logits[:, -1]
    torch.testing.assert_close(exact, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference, atol=WHOLE_IMAGE_BOUND, rtol=0)


def test_canvas_geometry_and_refusals(tiny):
    """The canvas of the processor's crops for pictures of 4 shapes (processor defaults: ratio 1.2 to activate,
    crops of at least 256 px, at most 4), the image tokens per layout, and the errors for inputs that are no canvas
    of the picture."""
    wrapper = wrap(tiny, pan_and_scan=True)
    expected = {(300, 330): (32, 32), LANDSCAPE: (32, 64), (1100, 280): (128, 32), (260, 1030): (32, 128),
                (260, 4000): (32, 128)}
    for size, canvas in expected.items():
        x = wrapper.preprocess(random_image(*size))
        layout = wrapper.layout_for(*x.shape[2:])
        assert tuple(x.shape[2:]) == wrapper.canvas_size(size) == canvas
        assert len(layout.image_positions) == G * G * (1 + (canvas[0] * canvas[1] // S ** 2 if canvas != (S, S)
                                                            else 0))
    with pytest.raises(ValueError, match="pan-and-scan canvas of 2 crops"):
        wrapper(torch.zeros(1, 3, 64, 32))  # source_size is the landscape 260x4000 picture
    with pytest.raises(ValueError, match="no Gemma 3 input"):
        wrapper(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="pan_and_scan_\\* keywords"):
        wrap(tiny, pan_and_scan=True, pan_and_scan_options={"max_num_crops": 2})
    assert wrap(tiny, pan_and_scan=True, pan_and_scan_options={"pan_and_scan_max_num_crops": 2}).canvas_size(
        (260, 1030)) == (32, 64)


def test_answer_score_equals_processor_path(tiny):
    """A teacher-forced answer with pan-and-scan crops: its tokens after the prompt, its score the sum of their
    log-probabilities on the processor path."""
    model, processor, _ = tiny
    image = shapes_image(*LANDSCAPE, seed=3)
    wrapper = wrap(tiny, answer=" red circle", pan_and_scan=True)
    x = wrapper.preprocess(image)
    inputs = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt", do_pan_and_scan=True)
    answer = wrapper.layout_for(*x.shape[2:]).answer_ids
    assert processor.tokenizer.decode(answer) == " red circle" and len(inputs["pixel_values"]) == 3
    inputs["pixel_values"][0] = wrapper.model_inputs(x)["pixel_values"][0]
    with torch.no_grad():
        log_probs = model(**inputs).logits[0, -len(answer) - 1:-1].log_softmax(-1)
        score = wrapper(x)
    expected = log_probs.gather(-1, answer[:, None]).sum()
    assert score.shape == (1, 1)
    torch.testing.assert_close(score[0, 0], expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_one_changed_cell_moves_its_own_cell_most(tiny, pan_and_scan):
    """Decoder layer 0, view "crops": change one 8-pixel cell of the input (the one image's 4x4, or every cell of
    both crops of a 4x8 canvas) and the map's largest change lands on that cell."""
    wrapper = wrap(tiny, view="crops", pan_and_scan=pan_and_scan)
    x = wrapper.preprocess(random_image(*LANDSCAPE, seed=5))
    cells = [(r, c) for r in range(x.shape[2] // 8) for c in range(x.shape[3] // 8)]
    assert len(cells) == (32 if pan_and_scan else 16)
    change = change_maps(wrapper, wrapper.decoder_layers[0], x, [(8 * r, 8 * r + 8, 8 * c, 8 * c + 8) for r, c in cells])
    width = change.shape[2]
    assert [divmod(int(i), width) for i in change.flatten(1).argmax(1)] == cells


def test_one_changed_whole_cell_moves_its_own_whole_cell_most(tiny):
    """View "whole", decoder layer 0, 4 crops: change the part of the canvas one whole-image token covers (the canvas
    cut in 4x4) and the largest change of the whole map, resized onto the canvas's grid, lies over that part."""
    wrapper = wrap(tiny, view="whole", pan_and_scan=True)
    x = wrapper.preprocess(random_image(260, 1030, seed=7))
    height, width = x.shape[2:]
    cells = [(i, j) for i in range(G) for j in range(G)]
    regions = [(height * i // G, height * (i + 1) // G, width * j // G, width * (j + 1) // G) for i, j in cells]
    change = change_maps(wrapper, wrapper.decoder_layers[0], x, regions)
    rows, cols = change.shape[1:]
    landed = [(int((r + 0.5) * G / rows), int((c + 0.5) * G / cols))
              for r, c in (divmod(int(k), cols) for k in change.flatten(1).argmax(1))]
    assert landed == cells


# ------------------------------------------------------------------------------------------- Grad-CAM by hand
@pytest.mark.parametrize("view", ["crops", "whole", "combined"])
def test_decoder_gradcam_equals_direct_computation(tiny, view):
    """Grad-CAM of decoder layer 1 by hand on the raw model with hooks: the processor's inputs (with the whole image
    the wrapper resizes from the canvas), the image tokens placed on the grid by hand. "combined" is the ReLU of the
    sum of the crop and whole maps before their ReLU, each with its own channel weights."""
    model, _, _ = tiny
    image = random_image(*LANDSCAPE, seed=8)
    wrapper = wrap(tiny, view=view, pan_and_scan=True)
    x = wrapper.preprocess(image)
    inputs = by_hand_inputs(wrapper, image, x)
    hidden, grad, target = hidden_and_grad(model, inputs, model.model.language_model.layers[1])
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    (a_crops, a_whole), (g_crops, g_whole) = [[views_by_hand(t[0, positions].reshape(3, G * G, -1), G, 2, v)
                                               for v in ("crops", "whole")] for t in (hidden, grad)]
    cam_crops, cam_whole = gradcam_by_hand(a_crops, g_crops), gradcam_by_hand(a_whole, g_whole)
    cam = torch.relu({"crops": cam_crops, "whole": cam_whole, "combined": cam_crops + cam_whole}[view])
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam_method:
        maps = cam_method(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    assert maps.shape == (1, 32, 64) and maps.max() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(maps, pipeline(cam.numpy(), x), atol=1e-4)


@pytest.mark.parametrize("where", ["vision_block", "projector"])
def test_vision_gradcam_equals_direct_computation_with_and_without_graph_start(tiny, where):
    """Vision block 0 (8x8 patches per image, view "crops") and the projector (4x4 pooled tokens, view
    "combined"), by hand on the raw model; equal with the graph started at the layer and with the whole graph."""
    model, _, _ = tiny
    image = random_image(*LANDSCAPE, seed=9)
    view, side = ("crops", P) if where == "vision_block" else ("combined", G)
    probe = wrap(tiny, pan_and_scan=True)
    x = probe.preprocess(image)
    layer = probe.vision_blocks[0] if where == "vision_block" else probe.projector
    hidden, grad, target = hidden_and_grad(model, by_hand_inputs(probe, image, x), layer)
    cam = torch.relu(gradcam_by_hand(views_by_hand(hidden, side, 2, view), views_by_hand(grad, side, 2, view)))
    for efficient in (True, False):
        wrapper = wrap(tiny, view=view, pan_and_scan=True, efficient_gradients=efficient)
        wrapper.source_size = probe.source_size
        target_layer = wrapper.vision_blocks[0] if where == "vision_block" else wrapper.projector
        with GradCAM(model=wrapper, target_layers=[target_layer], reshape_transform=wrapper.reshape_transform) as cm:
            maps = cm(input_tensor=x, targets=[ClassifierOutputTarget(target)])
        model.zero_grad(set_to_none=True)  # without efficient gradients, grad-cam's backward fills weight gradients
        np.testing.assert_allclose(maps, pipeline(cam.numpy(), x), atol=1e-5, err_msg=f"efficient={efficient}")


def test_last_decoder_layer_is_blank_and_warns(tiny):
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(40, 70))
    with pytest.warns(UserWarning, match=r"decoder_layers\[-2\] \(layer 2\)"):
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[-1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            assert cam(input_tensor=x, targets=None).max() == 0


# ------------------------------------------------------------------------------------------- attention
def test_attention_map_equals_output_attentions(tiny):
    """AttentionMap on decoder layer 1 equals the last position's head-mean attention to the image tokens, read from
    output_attentions (the processor's inputs, with the whole image the wrapper resizes) and placed on the grid by
    hand: one image without crops; each view of a 2-crop canvas ("combined": crops' plus whole image's). token_geometry
    names the whole image's tokens. AttentionRollout over the decoder layers: maps of the input size, not constant."""
    model, processor, _ = tiny
    image = random_image(*LANDSCAPE, seed=11)
    for pan_and_scan, views in ((False, ["combined"]), (True, ["crops", "whole", "combined"])):
        wrapper = wrap(tiny, pan_and_scan=pan_and_scan)
        x = wrapper.preprocess(image)
        inputs = by_hand_inputs(wrapper, image, x) if pan_and_scan else processor_inputs(processor, image, False)
        with wrapper.eager_attention(), torch.no_grad():
            row = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)
        positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
        assert len(positions) == (3 if pan_and_scan else 1) * G * G
        for view in views:
            wrapper.view = view
            with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[1]]) as cam:
                maps = cam(input_tensor=x, targets=None)
            expected = (views_by_hand(row[positions].reshape(3, G * G, 1), G, 2, view).sum(0) if pan_and_scan
                        else row[positions].reshape(G, G))
            assert maps.shape == (1,) + tuple(x.shape[2:])
            np.testing.assert_allclose(maps, pipeline(expected.numpy(), x), atol=1e-5, err_msg=view)
        assert torch.equal(wrapper.token_geometry()[1], positions[:G * G])
    with AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers) as cam:
        rollout = cam(input_tensor=torch.cat([x, x.flip(3)]), targets=None)
    assert rollout.shape == (2,) + tuple(x.shape[2:]) and rollout.max(axis=(1, 2)) == pytest.approx([1, 1], abs=1e-5)
    assert all(np.ptp(m) > 0.1 for m in rollout)


# ------------------------------------------------------------------------------------------- methods and state
@pytest.mark.parametrize("method", VLM_METHODS, ids=lambda m: m.__name__)
def test_every_method_runs_at_batch_1_and_2(tiny, method):
    """README's method table: each method on decoder layer 0 at batch 2 (pan-and-scan, view "combined": 2C
    channels) and on vision block 1 at batch 1 (AblationCAM: decoder layers only, refused on a vision block with the
    model intact)."""
    model, _, _ = tiny
    wrapper = wrap(tiny, pan_and_scan=True)
    check_method_on_decoder_and_vision(method, model, wrapper, wrapper.preprocess(random_image(*LANDSCAPE, seed=10)),
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
        wrapper = wrap(tiny, pan_and_scan=True)
        layers = [wrapper.decoder_layers[0], wrapper.vision_blocks[1], wrapper.projector]
        before = assert_state_kept_through_gradcam(model, wrapper, wrapper.preprocess(random_image(*LANDSCAPE)), layers)
        with pytest.raises(ValueError, match="view must be one of"):
            wrap(tiny, view="tiles")
        assert model_state(model) == before
# ------------------------------------------------------------------------------------------- auto, registry and CLI
@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_explain_returns_a_map_of_the_input_size(tiny, pan_and_scan):
    wrapper = wrap(tiny, pan_and_scan=pan_and_scan)
    x = wrapper.preprocess(random_image(*LANDSCAPE, seed=12))
    result = explain(wrapper, x)
    assert result.maps.shape == (1,) + tuple(x.shape[2:]) and result.maps.dtype == np.float32
    assert result.candidate_layers == ["projector", 0, 1, 2] and result.methods[0] in AUTO_METHODS
    m, l = result.candidate_methods.index(result.methods[0]), result.candidate_layers.index(result.layers[0])
    np.testing.assert_array_equal(result.maps[0], result.candidate_maps[0, m, l])


def test_cli_explain_writes_maps_and_report(tiny, tmp_path, capsys):
    _, _, folder = tiny
    Image.fromarray(random_image(70, 40, seed=13)).save(tmp_path / "image.png")
    check_cli_explain(folder, "gemma3", Gemma3Wrapper, tmp_path / "image.png", tmp_path, capsys)
