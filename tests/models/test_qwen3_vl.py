"""Qwen3VLWrapper on tiny Qwen3-VL (DeepStack) and Qwen3.5 (Gated DeltaNet and full-attention decoder layers)
models: QwenVLWrapper's contract, checked against the processor path, hand-made Grad-CAM and raw attention weights."""

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import (PROMPT, VLM_METHODS, assert_fullgrad_refused, assert_projector_candidate,
                      assert_state_kept_through_gradcam, chat_inputs, check_cli_explain,
                      check_method_on_decoder_and_vision, hidden_and_grad, partly_frozen_in_train_mode, random_image)
from pytorch_grad_cam_vlm import AttentionMap, AttentionRollout, Qwen3VLWrapper, build_tiny_qwen3_vl, patchify

FAMILIES = ["qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, model, processor, folder) of a tiny random model saved and loaded back: Qwen3-VL (and its MoE
    variant) with DeepStack from vision blocks 1 and 2; Qwen3.5 (and its MoE variant) with linear-attention decoder
    layers 0, 2 and full-attention layers 1, 3."""
    import transformers

    from pytorch_grad_cam_vlm.models.registry import QWEN_MODEL_CLASSES

    if not hasattr(transformers, QWEN_MODEL_CLASSES[request.param]):
        pytest.skip(f"transformers {transformers.__version__} has no {QWEN_MODEL_CLASSES[request.param]}")
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model, processor = build_tiny_qwen3_vl(folder, family=request.param, seed=0)
    return request.param, model, processor, str(folder)


def wrap(tiny, **kwargs):
    return Qwen3VLWrapper(tiny[1], tiny[2], prompt=PROMPT, **kwargs)


def grid_of(inputs):
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    return gh, gw


def image_positions(processor, input_ids):
    return (input_ids[0] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).nonzero().flatten()


def merge_order_to_grid(rows, gh, gw):
    """(h*w, C) vision-block rows in 2x2 merge-block order -> (C, h, w), by hand: rows 4i..4i+3 are the top-left,
    top-right, bottom-left and bottom-right patches of merged cell i, cells in raster order."""
    grid = torch.zeros(rows.shape[1], gh, gw)
    for i in range(gh * gw // 4):
        r, c = divmod(i, gw // 2)
        for k, (dr, dc) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            grid[:, 2 * r + dr, 2 * c + dc] = rows[4 * i + k]
    return grid


def gradcam_by_hand(activations, grads):
    """Grad-CAM of one image's (C, h, w) activations and gradients."""
    return torch.relu((activations * grads.mean((1, 2))[:, None, None]).sum(0)).numpy()


def pipeline(cam, x):
    """grad-cam's post-processing of one layer's map: scale to [0, 1] and resize, then scale the layer mean again."""
    return scale_cam_image(scale_cam_image(cam[None], (x.shape[3], x.shape[2])))


# ------------------------------------------------------------------------------------------- inputs and logits
@pytest.mark.parametrize("size", [(64, 64), (70, 100), (130, 250)])
def test_logits_and_pixels_equal_processor_path(tiny, size):
    family, model, processor, _ = tiny
    image = random_image(*size)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    inputs = chat_inputs(processor, image)
    gh, gw = grid_of(inputs)
    assert wrapper.token_cell == 32 and x.shape == (1, 3, gh * 16, gw * 16)
    assert torch.equal(patchify(x, 16, 2, 2), inputs["pixel_values"])  # temporal patch 2, 2x2 merge order
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        logits = wrapper(x)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape == (1, len(processor.tokenizer))
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)


def test_batch_patchify_and_preprocess_match_the_processor(tiny):
    _, _, processor, _ = tiny
    images = [random_image(96, 160, seed=s) for s in (1, 2)]
    wrapper = wrap(tiny)
    x = torch.cat([wrapper.preprocess(image) for image in images])
    encoded = processor.image_processor(images=images, return_tensors="pt")
    assert list(processor.image_processor.image_mean) == list(processor.image_processor.image_std) == [0.5] * 3
    assert torch.equal(patchify(x, 16, 2, 2), encoded["pixel_values"])
    assert wrapper.preprocess(random_image(130, 250)).shape == (1, 3, 128, 256)  # smart_resize to multiples of 32
    np.testing.assert_allclose(wrapper.to_rgb(x), np.stack(images) / 255.0, atol=1e-6)


def test_answer_score_equals_processor_path(tiny):
    family, model, processor, _ = tiny
    image = random_image(64, 96, seed=3)
    wrapper = wrap(tiny, answer="red circle")
    x = wrapper.preprocess(image)
    inputs = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt")
    answer = wrapper.layout_for(64, 96).answer_ids
    assert processor.tokenizer.convert_ids_to_tokens(answer) == ["red", "Ġcircle"]
    with torch.no_grad():
        log_probs = model(**inputs).logits[0, -len(answer) - 1:-1].log_softmax(-1)
        score = wrapper(x)
    expected = log_probs.gather(-1, answer[:, None]).sum()
    assert score.shape == (1, 1)
    torch.testing.assert_close(score[0, 0], expected, atol=1e-4, rtol=0)


def test_chat_template_kwargs_reach_the_template(tiny):
    family, model, processor, _ = tiny
    wrapper = wrap(tiny, chat_template_kwargs={"enable_thinking": False})
    default = wrap(tiny).chat_text()
    if family.startswith("qwen3_5"):  # Qwen3.5 opens a thinking block unless told not to
        assert default.endswith("<|im_start|>assistant\n<think>\n")
        assert wrapper.chat_text().endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    else:
        assert default.endswith("<|im_start|>assistant\n") and wrapper.chat_text() == default
    image = random_image(64, 64, seed=4)
    inputs = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(wrapper(wrapper.preprocess(image)), model(**inputs).logits[:, -1], atol=1e-4,
                                   rtol=0)


# ------------------------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("where", ["decoder_layer_0", "vision_block_0"])
def test_one_changed_cell_moves_its_own_cell_most(tiny, where):
    """A 64x96 image (2x3 tokens of 32 px, 4x6 patches of 16 px): change each cell in turn (all in one batch); the
    hidden state changes most at that cell, on the grid reshape_transform builds from image_grid_thw."""
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(64, 96, seed=5))
    cell = 32 if where.startswith("decoder") else 16
    gh, gw = 64 // cell, 96 // cell
    batch = x.repeat(gh * gw + 1, 1, 1, 1)
    for k in range(gh * gw):
        r, c = divmod(k, gw)
        batch[k + 1, :, cell * r:cell * (r + 1), cell * c:cell * (c + 1)] += 1.0
    layer = wrapper.decoder_layers[0] if where.startswith("decoder") else wrapper.vision_blocks[0]
    store = {}
    handle = layer.register_forward_hook(lambda m, a, o: store.__setitem__("grid", wrapper.reshape_transform(o)))
    with torch.no_grad():
        wrapper(batch)
    handle.remove()
    change = (store["grid"][1:] - store["grid"][:1]).norm(dim=1)
    assert change.shape == (gh * gw, gh, gw)
    assert change.flatten(1).argmax(1).tolist() == list(range(gh * gw))


# ------------------------------------------------------------------------------------------- Grad-CAM by hand
@pytest.mark.parametrize("index", [0, 1])
def test_decoder_gradcam_equals_direct_computation(tiny, index):
    """Decoder layer 0 (Qwen3.5: Gated DeltaNet; Qwen3-VL: DeepStack adds to its output) and 1 (full attention)."""
    family, model, processor, _ = tiny
    image = random_image(96, 160, seed=6)  # 3x5 tokens
    inputs = chat_inputs(processor, image)
    layer = model.model.language_model.layers[index]
    hidden, grad, target = hidden_and_grad(model, inputs, layer)
    positions = image_positions(processor, inputs["input_ids"])
    gh, gw = grid_of(inputs)
    activations = hidden[0, positions].T.reshape(-1, gh // 2, gw // 2)
    reference = gradcam_by_hand(activations, grad[0, positions].T.reshape(-1, gh // 2, gw // 2))
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[index]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        maps = cam(input_tensor=x, targets=None)
        explicit = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    assert maps.shape == (1, 96, 160) and maps.max() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(maps, pipeline(reference, x), atol=1e-4)
    np.testing.assert_allclose(explicit, pipeline(reference, x), atol=1e-4)


VISION_LAYERS = ["block0", "block1", "merger", "deepstack0"]


def vision_layer(visual, name):
    """The vision encoder's layer called ``name``: ``block<i>``, ``merger`` or ``deepstack<k>``."""
    if name.startswith("block"):
        return visual.blocks[int(name[-1])]
    return visual.merger if name == "merger" else visual.deepstack_merger_list[int(name[-1])]


@pytest.mark.parametrize("name", VISION_LAYERS)
def test_vision_gradcam_equals_direct_computation_with_and_without_graph_start(tiny, name):
    """Block 1 feeds DeepStack merger 0 (Qwen3-VL): its gradient comes through the next blocks and the DeepStack
    path. The map equals one by hand on the raw model (full graph) with the graph started at the shallowest target
    (efficient_gradients=True) and without (False)."""
    family, model, processor, _ = tiny
    if name.startswith("deepstack") and family.startswith("qwen3_5"):
        pytest.skip("Qwen3.5 has no DeepStack")
    if family.startswith("qwen3_vl"):
        assert model.config.vision_config.deepstack_visual_indexes == [1, 2]
    image = random_image(64, 160, seed=7)  # 4x10 patches, 2x5 tokens
    inputs = chat_inputs(processor, image)
    layer = vision_layer(model.model.visual, name)
    hidden, grad, target = hidden_and_grad(model, inputs, layer)
    gh, gw = grid_of(inputs)
    if name.startswith("block"):
        activations, grads = merge_order_to_grid(hidden, gh, gw), merge_order_to_grid(grad, gh, gw)
    else:  # one row per merged cell, in raster order
        activations, grads = (t.T.reshape(-1, gh // 2, gw // 2) for t in (hidden, grad))
    expected = pipeline(gradcam_by_hand(activations, grads), torch.zeros(1, 3, 64, 160))
    for efficient in (True, False):
        wrapper = wrap(tiny, efficient_gradients=efficient)
        target_layer = vision_layer(wrapper.visual, name)
        with GradCAM(model=wrapper, target_layers=[target_layer], reshape_transform=wrapper.reshape_transform) as cam:
            maps = cam(input_tensor=wrapper.preprocess(image), targets=[ClassifierOutputTarget(target)])
        model.zero_grad(set_to_none=True)  # without efficient gradients, grad-cam's backward fills weight gradients
        np.testing.assert_allclose(maps, expected, atol=1e-5, err_msg=f"efficient_gradients={efficient}")


def test_deepstack_merger_starts_the_graph_at_its_block(tiny):
    """A DeepStack merger watched together with a later block: the graph starts at the input of the merger's block
    (block 1), so that block 1's output is in the graph for both paths, and the maps equal the full graph's."""
    family, model, processor, _ = tiny
    if not family.startswith("qwen3_vl"):
        pytest.skip("DeepStack is Qwen3-VL's")
    x = wrap(tiny).preprocess(random_image(64, 96, seed=8))
    maps, seen = {}, {}

    def probe(name):
        def record(module, args, kwargs):
            seen[name] = (args[0].requires_grad, torch.is_grad_enabled())
        return record

    for efficient in (True, False):
        wrapper = wrap(tiny, efficient_gradients=efficient)
        layers = [wrapper.deepstack_mergers[0], wrapper.vision_blocks[3]]
        assert wrapper.deepstack_visual_indexes == [1, 2]
        handles = [wrapper.vision_blocks[i].register_forward_pre_hook(probe(i), with_kwargs=True) for i in (0, 2)]
        try:
            with GradCAM(model=wrapper, target_layers=layers, reshape_transform=wrapper.reshape_transform) as cam:
                maps[efficient] = cam(input_tensor=x, targets=[ClassifierOutputTarget(5)])
        finally:
            for handle in handles:
                handle.remove()
        model.zero_grad(set_to_none=True)
        if efficient:
            assert seen[0] == (False, False) and seen[2] == (True, True)
    assert maps[True].max() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(maps[True], maps[False], atol=1e-5)


# ------------------------------------------------------------------------------------------- methods and state
@pytest.mark.parametrize("method", VLM_METHODS, ids=lambda m: m.__name__)
def test_every_method_runs_at_batch_1_and_2(tiny, method):
    """README's method table: each method on a decoder layer at batch 2 and on vision block 1 (Qwen3-VL: a DeepStack
    block) at batch 1 (AblationCAM: decoder layers only, refused on a vision block with the model left intact)."""
    family, model, processor, _ = tiny
    wrapper = wrap(tiny)
    check_method_on_decoder_and_vision(method, model, wrapper, wrapper.preprocess(random_image(64, 96, seed=9)),
                                       wrapper.decoder_layers[-2], "vision blocks and mergers are not supported")


def test_fullgrad_raises_its_documented_error(tiny):
    wrapper = wrap(tiny)
    assert_fullgrad_refused(wrapper, wrapper.preprocess(random_image(64, 64)))


def test_the_projector_is_an_explain_candidate(tiny):
    wrapper = wrap(tiny)
    assert_projector_candidate(wrapper, wrapper.merger, wrapper.preprocess(random_image(64, 64)))


def test_model_state_restored_after_call_and_after_exception(tiny):
    family, model, processor, _ = tiny
    with partly_frozen_in_train_mode(model, model.model.visual):
        wrapper = wrap(tiny)
        assert_state_kept_through_gradcam(model, wrapper, wrapper.preprocess(random_image(64, 96)),
                                          [wrapper.decoder_layers[0], wrapper.vision_blocks[1]])


def test_last_decoder_layer_warns_and_names_a_working_layer(tiny):
    wrapper = wrap(tiny)
    with pytest.warns(UserWarning, match=r"decoder_layers\[-2\] \(layer 2\)"):
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[-1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            maps = cam(input_tensor=wrapper.preprocess(random_image(64, 64)), targets=None)
    assert maps.max() == 0


# ------------------------------------------------------------------------------------------- attention
def test_attention_map_equals_output_attentions(tiny):
    """On a full-attention decoder layer, AttentionMap equals the last position's head-mean attention to the image
    tokens read from output_attentions; Qwen3.5's linear-attention layers are refused with the layers to use."""
    family, model, processor, _ = tiny
    wrapper = wrap(tiny)
    qwen3_5 = family.startswith("qwen3_5")
    assert wrapper.full_attention_layers == ([1, 3] if qwen3_5 else [0, 1, 2, 3])
    image = random_image(64, 160, seed=10)
    x = wrapper.preprocess(image)
    index = 1
    with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[index]]) as cam:
        maps = cam(input_tensor=x, targets=None)
    inputs = chat_inputs(processor, image)
    with wrapper.eager_attention(), torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    assert len(attentions) == len(wrapper.full_attention_layers)
    row = attentions[wrapper.full_attention_layers.index(index)][0, :, -1].mean(0)
    gh, gw = grid_of(inputs)
    expected = row[image_positions(processor, inputs["input_ids"])].reshape(gh // 2, gw // 2).numpy()
    np.testing.assert_allclose(maps, pipeline(expected, x), atol=1e-5)
    if qwen3_5:
        for linear in (0, 2):
            with pytest.raises(ValueError, match=rf"Decoder layer {linear} is a linear-attention \(Gated DeltaNet\) "
                                                 r"layer.*decoder_layers\[i\] for i in \[1, 3\]"):
                AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[linear]])
        with pytest.raises(ValueError, match="Decoder layer 0 is a linear-attention"):
            AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers)
    else:
        with AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers) as cam:
            rollout = cam(input_tensor=torch.cat([x, x.flip(3)]), targets=None)
        assert rollout.shape == (2, 64, 160) and rollout.max() == pytest.approx(1, abs=1e-5)


# ------------------------------------------------------------------------------------------- registry and CLI
def test_cli_explain_writes_maps_and_report(tiny, tmp_path, capsys):
    family, _, _, folder = tiny
    Image.fromarray(random_image(70, 100, seed=11)).save(tmp_path / "image.png")
    x = check_cli_explain(folder, family, Qwen3VLWrapper, tmp_path / "image.png", tmp_path, capsys)
    assert x.shape[2:] == (64, 96)
