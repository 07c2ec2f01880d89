"""Glm4vWrapper on tiny GLM-4V, GLM-4V-MoE and GLM-4.6V models: QwenVLWrapper's contract on GLM's encoder (merge-block
patches, a strided 2x2 convolution and a gated merger, 3-D rotary positions), checked against the processor path,
exact token geometry and Grad-CAM by hand."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import (DEVICES, PROMPT, VLM_METHODS, assert_fullgrad_refused, assert_projector_candidate,
                      assert_state_kept_through_gradcam, chat_inputs, check_cli_explain,
                      check_method_on_decoder_and_vision, hidden_and_grad, partly_frozen_in_train_mode, random_image)
from test_llava import change_maps, shapes_image
from test_mistral3 import (check_benchmark_and_explorer, check_cells_change_exactly, check_explain,
                           check_frame_is_a_resize, check_per_token)
from test_qwen3_vl import gradcam_by_hand, grid_of, merge_order_to_grid, pipeline
from pytorch_grad_cam_vlm import AttentionMap, AttentionRollout, Glm4vWrapper, build_tiny_glm4v, patchify

CELL = 28  # one image token: 2x2 patches of 14 px
SIZES = [(56, 56), (70, 100), (130, 250), (300, 90)]  # square, landscape, shrunk to the pixel budget, portrait


@pytest.fixture(scope="module", params=["glm4v", "glm4v_moe", "glm46v"])
def tiny(request, tmp_path_factory):
    """(model, processor, folder) of a tiny random GLM-4V (GLM-4.1V), GLM-4V-MoE (GLM-4.5V: experts from decoder
    layer 1 on) or GLM-4.6V (its own processor classes) saved and loaded back (see models/tiny/glm4v.py)."""
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model, processor = build_tiny_glm4v(folder, family=request.param, seed=0)
    return model, processor, str(folder)


def wrap(tiny, **kwargs):
    return Glm4vWrapper(tiny[0], tiny[1], prompt=PROMPT, **kwargs)


def image_positions(processor, input_ids):
    return (input_ids[0] == processor.tokenizer.convert_tokens_to_ids("<|image|>")).nonzero().flatten()


# ------------------------------------------------------------------------------------------- inputs and logits
@pytest.mark.parametrize("size", SIZES)
def test_logits_and_pixels_equal_processor_path(tiny, size):
    """The wrapper feeds the processor's exact inputs (pixel values by patchify, input_ids, mm_token_type_ids):
    logits to 1e-5."""
    model, processor, _ = tiny
    image = shapes_image(*size, seed=1)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    inputs = chat_inputs(processor, image)
    gh, gw = grid_of(inputs)
    assert wrapper.token_cell == CELL and x.shape == (1, 3, gh * 14, gw * 14)
    assert torch.equal(patchify(x, 14, 2, 2), inputs["pixel_values"])
    built = wrapper.model_inputs(x)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert torch.equal(built[key], inputs[key]), key
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert "".join(tokens[:5]) == "[gMASK]<sop><|user|>Ċ<|begin_of_image|>"
    assert tokens[5:6 + gh * gw // 4] == ["<|image|>"] * (gh * gw // 4) + ["<|end_of_image|>"]
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        logits = wrapper(x)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape == (1, len(processor.tokenizer))
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_answer_score_and_thinking_switch_equal_processor_path(tiny):
    """A teacher-forced answer (its tokens after the prompt, its score the sum of their log-probabilities), with the
    chat template's enable_thinking=False (an empty thinking block after the generation prompt)."""
    model, processor, _ = tiny
    image = shapes_image(70, 100, seed=3)
    wrapper = wrap(tiny, answer="red circle", chat_template_kwargs={"enable_thinking": False})
    assert wrapper.chat_text().endswith("<|assistant|>\n<think></think>\nred circle")
    assert wrap(tiny).chat_text().endswith("<|assistant|>\n")
    x = wrapper.preprocess(image)
    inputs = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt")
    answer = wrapper.layout_for(*x.shape[2:]).answer_ids
    assert processor.tokenizer.convert_ids_to_tokens(answer) == ["red", "Ġcircle"]
    with torch.no_grad():
        log_probs = model(**inputs).logits[0, -len(answer) - 1:-1].log_softmax(-1)
        score = wrapper(x)
    torch.testing.assert_close(score[0, 0], log_probs.gather(-1, answer[:, None]).sum(), atol=1e-5, rtol=0)


def test_refusals(tiny):
    model, processor, _ = tiny
    with pytest.raises(ValueError, match="inserts the image"):
        Glm4vWrapper(model, processor, prompt="<|begin_of_image|><|image|> What is this?")
    with pytest.raises(ValueError, match="multiples of 28 pixels"):
        wrap(tiny)(torch.zeros(1, 3, 56, 70))


# ------------------------------------------------------------------------------------------- the grid
def local_copy(model):
    """The model with the vision attention's output projections zeroed: each patch's features then come from its
    own pixels (and its position) only, and the 2x2 convolution and merger act per cell, so a change of one token
    cell reaches exactly that cell's image token."""
    local = copy.deepcopy(model)
    with torch.no_grad():
        for block in local.model.visual.blocks:
            block.attn.proj.weight.zero_()
    return local


@pytest.mark.parametrize("size", [(70, 100), (300, 90)])
def test_one_changed_cell_changes_exactly_its_own_token(tiny, size):
    """Raise one 28-pixel cell of the input: the merger's rows and the decoder's input embeddings change exactly at
    the token reshape_transform puts on that cell (on the model whose patches do not mix); the text embeddings never
    change."""
    model, processor, _ = tiny
    local = local_copy(model)
    wrapper = Glm4vWrapper(local, processor, prompt=PROMPT)
    check_cells_change_exactly(wrapper, local.model.language_model.layers[0], random_image(*size, seed=4), CELL)


def test_one_changed_cell_moves_its_own_cell_most(tiny):
    """On the model as it is (patches mix in attention): the merger and vision block 0 change most at the changed
    cell (a token cell of 28 px; a patch of 14 px). Decoder layer 0's random attention moves other tokens more for
    2 of these 8 cells; its input is checked exactly above."""
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(70, 100, seed=5))
    for layer, cell in ((wrapper.projector, CELL), (wrapper.vision_blocks[0], 14)):
        rows, cols = x.shape[2] // cell, x.shape[3] // cell
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        change = change_maps(wrapper, layer, x, [(cell * r, cell * r + cell, cell * c, cell * c + cell)
                                                  for r, c in cells])
        assert [divmod(int(i), cols) for i in change.flatten(1).argmax(1)] == cells


def test_image_frame_carries_the_input_onto_the_picture(tiny):
    """smart_resize stretches the picture onto the input: image_frame carries the input back onto it."""
    check_frame_is_a_resize(wrap(tiny), [(70, 100), (300, 90)])


# ------------------------------------------------------------------------------------------- Grad-CAM by hand
@pytest.mark.parametrize("where", ["decoder", "vision_block", "merger"])
def test_gradcam_equals_direct_computation_with_and_without_graph_start(tiny, where):
    """Decoder layer 1 at the <|image|> positions, vision block 0 (merge-block order undone) and the merger (one row
    per cell in raster order), by hand on the raw model with the processor's inputs; equal with the graph started
    at the layer and with the whole graph."""
    model, processor, _ = tiny
    image = random_image(70, 160, seed=8)
    inputs = chat_inputs(processor, image)
    gh, gw = grid_of(inputs)
    layer = {"decoder": model.model.language_model.layers[1], "vision_block": model.model.visual.blocks[0],
             "merger": model.model.visual.merger}[where]
    hidden, grad, target = hidden_and_grad(model, inputs, layer)
    if where == "decoder":
        positions = image_positions(processor, inputs["input_ids"])
        activations, grads = (t[0, positions].T.reshape(-1, gh // 2, gw // 2) for t in (hidden, grad))
    elif where == "vision_block":
        activations, grads = merge_order_to_grid(hidden, gh, gw), merge_order_to_grid(grad, gh, gw)
    else:
        activations, grads = (t.T.reshape(-1, gh // 2, gw // 2) for t in (hidden, grad))
    x0 = torch.zeros(1, 3, gh * 14, gw * 14)
    expected = pipeline(gradcam_by_hand(activations, grads), x0)
    for efficient in (True, False):
        wrapper = wrap(tiny, efficient_gradients=efficient)
        target_layer = {"decoder": wrapper.decoder_layers[1], "vision_block": wrapper.vision_blocks[0],
                        "merger": wrapper.projector}[where]
        with GradCAM(model=wrapper, target_layers=[target_layer], reshape_transform=wrapper.reshape_transform) as cam:
            maps = cam(input_tensor=wrapper.preprocess(image), targets=[ClassifierOutputTarget(target)])
        model.zero_grad(set_to_none=True)  # without efficient gradients, grad-cam's backward fills weight gradients
        assert maps.shape == (1,) + tuple(x0.shape[2:]) and maps.max() == pytest.approx(1, abs=1e-5)
        np.testing.assert_allclose(maps, expected, atol=1e-5, err_msg=f"efficient_gradients={efficient}")


@pytest.mark.parametrize("device", DEVICES)
def test_batch_of_two_gradcam_equals_direct_computation(tiny, device, to_device):
    """Two pictures in one batch: grad-cam's maps at decoder layer 1 and vision block 1 equal those by hand on the
    processor's batch of both (each row its own argmax target); logits equal too; on CUDA as on the CPU."""
    model, processor, _ = tiny
    model = to_device(model, device)
    images = [random_image(100, 60, seed=s) for s in (9, 10)]
    chat = [chat_inputs(processor, image) for image in images]
    inputs = {key: torch.cat([c[key] for c in chat]).to(device) for key in chat[0]}
    gh, gw = grid_of(chat[0])
    wrapper = Glm4vWrapper(model, processor, prompt=PROMPT)
    x = torch.cat([wrapper.preprocess(image) for image in images]).to(device)
    assert torch.equal(patchify(x, 14, 2, 2), inputs["pixel_values"])
    for layer, target_layer in ((model.model.language_model.layers[1], wrapper.decoder_layers[1]),
                                (model.model.visual.blocks[1], wrapper.vision_blocks[1])):
        store = {}

        def keep(module, args, output):
            output.retain_grad()
            store["hidden"] = output

        handle = layer.register_forward_hook(keep)
        logits = model(**inputs).logits[:, -1]
        handle.remove()
        targets = logits.argmax(-1)
        logits.gather(1, targets[:, None]).sum().backward()
        model.zero_grad(set_to_none=True)
        hidden, grad = store["hidden"].detach().cpu(), store["hidden"].grad.cpu()
        if hidden.dim() == 3:
            positions = image_positions(processor, inputs["input_ids"].cpu())
            pairs = [(h[positions].T.reshape(-1, gh // 2, gw // 2), g[positions].T.reshape(-1, gh // 2, gw // 2))
                     for h, g in zip(hidden, grad)]
        else:
            pairs = [(merge_order_to_grid(h, gh, gw), merge_order_to_grid(g, gh, gw))
                     for h, g in zip(hidden.chunk(2), grad.chunk(2))]
        expected = np.concatenate([pipeline(gradcam_by_hand(h, g), x) for h, g in pairs])
        with GradCAM(model=wrapper, target_layers=[target_layer], reshape_transform=wrapper.reshape_transform) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        np.testing.assert_allclose(maps, expected, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), model(**inputs).logits[:, -1].float(), atol=1e-5, rtol=0)


def test_last_decoder_layer_is_blank_and_warns(tiny):
    wrapper = wrap(tiny)
    with pytest.warns(UserWarning, match=r"decoder_layers\[-2\] \(layer 2\)"):
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[-1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            assert cam(input_tensor=wrapper.preprocess(random_image(56, 84)), targets=None).max() == 0


# ------------------------------------------------------------------------------------------- attention
def test_attention_map_equals_output_attentions(tiny):
    """AttentionMap on decoder layer 1 equals the last position's head-mean attention to the <|image|> tokens read
    from output_attentions, placed on the token grid by hand; AttentionRollout gives maps of the input size."""
    model, processor, _ = tiny
    image = random_image(70, 160, seed=11)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    inputs = chat_inputs(processor, image)
    with wrapper.eager_attention(), torch.no_grad():
        row = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)
    gh, gw = grid_of(inputs)
    expected = row[image_positions(processor, inputs["input_ids"])].reshape(gh // 2, gw // 2).numpy()
    with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[1]]) as cam:
        maps = cam(input_tensor=x, targets=None)
    np.testing.assert_allclose(maps, pipeline(expected, x), atol=1e-5)
    with AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers) as cam:
        rollout = cam(input_tensor=torch.cat([x, x.flip(3)]), targets=None)
    assert rollout.shape == (2,) + tuple(x.shape[2:]) and rollout.max(axis=(1, 2)) == pytest.approx([1, 1], abs=1e-5)


# ------------------------------------------------------------------------------------------- methods and state
@pytest.mark.parametrize("method", VLM_METHODS, ids=lambda m: m.__name__)
def test_every_method_runs_at_batch_1_and_2(tiny, method):
    """README's method table: each method on decoder layer 1 at batch 2 and on vision block 1 at batch 1
    (AblationCAM: decoder layers only, refused on a vision block with the model intact). A noise picture: on the
    flat areas of a picture of shapes, most methods' maps of this random model are blank at decoder layer 0, and
    HiResCAM's and LayerCAM's at layer 1 (their channel weights come out negative)."""
    model, _, _ = tiny
    wrapper = wrap(tiny)
    check_method_on_decoder_and_vision(method, model, wrapper, wrapper.preprocess(random_image(70, 100, seed=12)),
                                       wrapper.decoder_layers[1], "vision blocks and mergers are not supported")


def test_fullgrad_raises_its_documented_error(tiny):
    wrapper = wrap(tiny)
    assert_fullgrad_refused(wrapper, wrapper.preprocess(random_image(56, 56)))


def test_the_projector_is_an_explain_candidate(tiny):
    wrapper = wrap(tiny)
    assert_projector_candidate(wrapper, wrapper.model.model.visual.merger, wrapper.preprocess(random_image(56, 84)))


def test_model_state_restored_after_call_and_after_exception(tiny):
    model, _, _ = tiny
    with partly_frozen_in_train_mode(model, model.model.visual):
        wrapper = wrap(tiny)
        layers = [wrapper.decoder_layers[0], wrapper.vision_blocks[1], wrapper.projector]
        assert_state_kept_through_gradcam(model, wrapper, wrapper.preprocess(random_image(70, 100)), layers)


# ------------------------------------------------------------------------------------------- auto, registry and CLI
def test_explain_returns_a_map_of_the_input_size(tiny):
    check_explain(wrap(tiny), shapes_image(70, 100, seed=13))


def test_cli_explain_writes_maps_and_report(tiny, tmp_path, capsys):
    _, _, folder = tiny
    Image.fromarray(random_image(70, 100, seed=14)).save(tmp_path / "image.png")
    x = check_cli_explain(folder, tiny[0].config.model_type, Glm4vWrapper, tmp_path / "image.png", tmp_path, capsys)
    assert x.shape[2:] == (56, 112)


def test_per_token_maps_follow_the_processor_path(tiny):
    check_per_token(wrap(tiny), tiny[0], tiny[1], shapes_image(70, 100, seed=15))


def test_benchmark_and_explorer_run_on_a_saved_checkpoint(tiny, tmp_path):
    model, processor, folder = tiny
    check_benchmark_and_explorer(model, processor, model.config.model_type, folder, tmp_path)
