"""Gemma4Wrapper on tiny Gemma 4 models (dense with per-layer inputs, mixture of experts, keys and values shared
between layers): QwenVLWrapper's contract, checked against the processor path, single-cell perturbations through
the vision tower, the projector and the decoder input, and hand-made Grad-CAM."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from transformers.models.gemma4.image_processing_gemma4 import get_aspect_ratio_preserving_size

from conftest import (DEVICES, PROMPT, VLM_METHODS, assert_fullgrad_refused, assert_projector_candidate,
                      assert_state_kept_through_gradcam, check_cli_explain, check_method_on_decoder_and_vision,
                      hidden_and_grad, model_state, partly_frozen_in_train_mode, random_image)
from test_llava import gradcam_by_hand, pipeline, shapes_image
from pytorch_grad_cam_vlm import AttentionMap, AttentionRollout, Gemma4Wrapper, build_tiny_gemma4, explain
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS
from pytorch_grad_cam_vlm.models.gemma4 import patchify_padded
from pytorch_grad_cam_vlm.models.registry import layer_count, make_subject, model_config

CELL = 12  # pixels per soft token of the tiny models: 4-pixel patches pooled 3x3
PATCH = 4
BUDGET = 70 * 9  # padded patches: 70 soft tokens of 3x3 patches
# Pictures and the inputs the processor makes of them: square, landscape, a tall strip, and one whose input the
# processor's resize would change again (20x64 gives 48x168; resized once more, 48x180).
SIZES = [((60, 60), (96, 96)), ((50, 90), (72, 132)), ((300, 40), (264, 36)), ((20, 64), (48, 168))]


@pytest.fixture(scope="module", params=["dense", "moe"])
def tiny(request, tmp_path_factory):
    """(model, processor, folder) of a tiny random Gemma 4 saved and loaded back (models/tiny/gemma4.py): dense
    with per-layer inputs (as E2B/E4B), or experts in every layer (as 26B-A4B)."""
    folder = tmp_path_factory.mktemp(f"tiny_gemma4_{request.param}")
    model, processor = build_tiny_gemma4(folder, moe=request.param == "moe")
    return model, processor, str(folder)


def wrap(tiny, **kwargs):
    return Gemma4Wrapper(tiny[0], tiny[1], prompt=PROMPT, **kwargs)


def processor_inputs(processor, image):
    """The reference path: the processor's chat template, tokenized with the image (one <bos>, mm_token_type_ids)."""
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                             {"type": "text", "text": PROMPT}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    inputs.pop("num_soft_tokens_per_image", None)
    return inputs


def image_positions(model, inputs):
    return (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()


# ------------------------------------------------------------------------------------------- inputs and logits
@pytest.mark.parametrize("size,expected", SIZES)
def test_logits_equal_processor_path(tiny, size, expected):
    """preprocess resizes once, as the processor does (its size function on the picture's size); forward's inputs
    are the processor's exactly (input_ids, attention_mask, mm_token_type_ids, padded pixel_values and (x, y)
    positions built in torch), so the logits agree to 1e-5; the processor on the wrapper's chat text gives the same
    inputs."""
    model, processor, _ = tiny
    image = shapes_image(*size, seed=1)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    assert tuple(x.shape) == (1, 3) + expected == (1, 3) + get_aspect_ratio_preserving_size(*size, PATCH, BUDGET, 3)
    inputs = processor_inputs(processor, image)
    direct = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        logits = wrapper(x)
        built = wrapper.model_inputs(x)
    assert sorted(built) == sorted(inputs) and list(inputs["input_ids"][0]).count(processor.tokenizer.bos_token_id) == 1
    for key in inputs:
        assert torch.equal(built[key], inputs[key]) and torch.equal(direct[key], inputs[key]), key
    assert wrapper.layout.grid == (expected[0] // CELL, expected[1] // CELL)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape == (1, len(processor.tokenizer))
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_patches_and_positions_follow_the_processor_and_carry_gradients():
    """patchify_padded on a 2-image batch: each image's rows equal Gemma4ImageProcessor's (patches flattened as row,
    column, channel; (x, y) positions; zero rows and (-1, -1) after them), and the gradient reaches every pixel."""
    from transformers import Gemma4ImageProcessor

    processor = Gemma4ImageProcessor(patch_size=PATCH, pooling_kernel_size=3, max_soft_tokens=70, do_resize=False)
    images = torch.rand(2, 3, 24, 36, requires_grad=True)
    pixel_values, positions = patchify_padded(images, PATCH, BUDGET)
    encoded = processor(images=list(images.detach() * 255), return_tensors="pt", do_rescale=True)
    torch.testing.assert_close(pixel_values.detach(), encoded["pixel_values"], atol=1e-6, rtol=0)
    assert torch.equal(positions, encoded["image_position_ids"]) and positions[0, 6 * 9].tolist() == [-1, -1]
    pixel_values.sum().backward()
    assert torch.equal(images.grad, torch.ones_like(images))


def test_answer_score_equals_processor_path(tiny):
    """A teacher-forced answer: its tokens after the prompt, its score the sum of their log-probabilities on the
    processor path."""
    model, processor, _ = tiny
    image = shapes_image(50, 90, seed=3)
    wrapper = wrap(tiny, answer=" red circle")
    x = wrapper.preprocess(image)
    inputs = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt")
    inputs.pop("num_soft_tokens_per_image", None)
    answer = wrapper.layout_for(*x.shape[2:]).answer_ids
    assert processor.tokenizer.decode(answer) == " red circle"
    with torch.no_grad():
        log_probs = model(**inputs).logits[0, -len(answer) - 1:-1].log_softmax(-1)
        score = wrapper(x)
    assert score.shape == (1, 1)
    torch.testing.assert_close(score[0, 0], log_probs.gather(-1, answer[:, None]).sum(), atol=1e-5, rtol=0)


def test_refusals(tiny):
    wrapper = wrap(tiny)
    with pytest.raises(ValueError, match="multiples of 12 pixels"):
        wrapper(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ValueError, match="above the budget of 630"):
        wrapper(torch.zeros(1, 3, 96, 108))  # 24x27 patches
    with pytest.raises(ValueError, match="Pass the question alone"):
        Gemma4Wrapper(tiny[0], tiny[1], prompt="<|image|> What?")


# ------------------------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("size", [(50, 90), (300, 40)])
def test_one_changed_cell_changes_exactly_its_own_tokens(tiny, size):
    """With the vision tower's attention silenced (post-attention norms zero, so that no block mixes patches, as
    NOTES.md advises for random towers), raising one 12-pixel cell changes exactly the 3x3 patches reshape_transform
    puts on it at vision block 1, exactly the soft token it puts there at the projector and at the decoder's input,
    and no text position; every cell of a landscape and of a tall input."""
    model = copy.deepcopy(tiny[0])
    for block in model.model.vision_tower.encoder.layers:
        torch.nn.init.zeros_(block.post_attention_layernorm.weight)
    wrapper = Gemma4Wrapper(model, tiny[1], prompt=PROMPT)
    x = wrapper.preprocess(random_image(*size, seed=5))
    gh, gw = x.shape[2] // CELL, x.shape[3] // CELL
    cells = [(r, c) for r in range(gh) for c in range(gw)]
    batch = x.repeat(len(cells) + 1, 1, 1, 1)
    for k, (r, c) in enumerate(cells):
        batch[k + 1, :, CELL * r:CELL * (r + 1), CELL * c:CELL * (c + 1)] += 0.5
    store = {}
    hooks = [wrapper.vision_blocks[1].register_forward_hook(lambda m, a, o: store.__setitem__("block", o)),
             wrapper.projector.register_forward_hook(lambda m, a, o: store.__setitem__("projector", o)),
             wrapper.decoder_layers[0].register_forward_pre_hook(lambda m, a: store.__setitem__("decoder", a[0]))]
    with torch.no_grad():
        wrapper(batch)
    for hook in hooks:
        hook.remove()
    positions = wrapper.layout.vision_positions
    text = torch.ones(wrapper.layout.sequence_length, dtype=torch.bool)
    text[positions] = False
    assert torch.equal(store["decoder"][1:, text], store["decoder"][:1, text].expand(len(cells), -1, -1))
    for name, side in (("block", 3), ("projector", 1), ("decoder", 1)):
        grid = wrapper.reshape_transform(store[name])
        assert grid.shape[2:] == (gh * side, gw * side), name
        change = (grid[1:] - grid[:1]).abs().amax(1)
        for k, (r, c) in enumerate(cells):
            expected = torch.zeros(gh * side, gw * side, dtype=torch.bool)
            expected[side * r:side * (r + 1), side * c:side * (c + 1)] = True
            scale = float(change[k].max())
            assert scale > 0 and torch.equal(change[k] > 1e-6 * scale, expected), (name, r, c)


# ------------------------------------------------------------------------------------------- Grad-CAM by hand
@pytest.mark.parametrize("where", ["decoder", "vision_block", "projector"])
def test_gradcam_equals_direct_computation_at_batch_1_and_2(tiny, where):
    """Grad-CAM by hand on the raw model with hooks (the processor's inputs, the rows placed on the grid by hand:
    the image positions of decoder layer 1, the unpadded patches of vision block 0, the projector's rows) equals
    grad-cam's on the wrapper for the image alone and for the image with its mirror in one batch, with the graph
    started at the layer and with the whole graph; the model is left as it was."""
    model, processor, _ = tiny
    images = [random_image(50, 90, seed=9), random_image(50, 90, seed=9)[:, ::-1].copy()]
    probe = wrap(tiny)
    x = torch.cat([probe.preprocess(image) for image in images])
    assert torch.equal(x[1], x[0].flip(2))
    layer = {"decoder": model.model.language_model.layers[1], "vision_block": probe.vision_blocks[0],
             "projector": probe.projector}[where]
    gh, gw = 72 // CELL, 132 // CELL
    cams, targets = [], []
    for image in images:
        inputs = processor_inputs(processor, image)
        hidden, grad, target = hidden_and_grad(model, inputs, layer)
        if where == "decoder":
            positions = image_positions(model, inputs)
            hidden, grad = hidden[0, positions], grad[0, positions]
        elif where == "vision_block":
            hidden, grad, gh, gw = hidden[0, :18 * 33], grad[0, :18 * 33], 18, 33
        on_grid = [t.T.reshape(-1, gh, gw) for t in (hidden, grad)]
        cams.append(pipeline(torch.relu(gradcam_by_hand(*on_grid)).numpy(), x[:1])[0])
        targets.append(ClassifierOutputTarget(target))
    before = model_state(model)
    for efficient in (True, False):
        wrapper = wrap(tiny, efficient_gradients=efficient)
        target_layer = {"decoder": wrapper.decoder_layers[1], "vision_block": wrapper.vision_blocks[0],
                        "projector": wrapper.projector}[where]
        for batch in (1, 2):
            with GradCAM(model=wrapper, target_layers=[target_layer], reshape_transform=wrapper.reshape_transform) as cam:
                maps = cam(input_tensor=x[:batch], targets=targets[:batch])
            model.zero_grad(set_to_none=True)  # without efficient gradients, grad-cam's backward fills weight grads
            np.testing.assert_allclose(maps, np.stack(cams[:batch]), atol=1e-5, err_msg=f"{efficient}, {batch}")
    assert model_state(model) == before


def test_last_decoder_layer_is_blank_and_warns(tiny):
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(50, 90))
    with pytest.warns(UserWarning, match=r"decoder_layers\[2\]"):
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[-1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            assert cam(input_tensor=x, targets=None).max() == 0


# ------------------------------------------------------------------------------------------- attention
def test_attention_map_equals_output_attentions(tiny):
    """AttentionMap on decoder layer 1 equals the last position's head-mean attention to the soft tokens, read from
    output_attentions on the processor's inputs and placed on the grid by hand; AttentionRollout over the decoder
    layers gives maps of the input size, not constant."""
    model, processor, _ = tiny
    image = random_image(50, 90, seed=11)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    inputs = processor_inputs(processor, image)
    with wrapper.eager_attention(), torch.no_grad():
        row = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)
    positions = image_positions(model, inputs)
    with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[1]]) as cam:
        maps = cam(input_tensor=x, targets=None)
    assert torch.equal(wrapper.token_geometry()[1], positions)
    np.testing.assert_allclose(maps, pipeline(row[positions].reshape(6, 11).numpy(), x), atol=1e-5)
    with AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers) as cam:
        rollout = cam(input_tensor=torch.cat([x, x.flip(3)]), targets=None)
    assert rollout.shape == (2,) + tuple(x.shape[2:]) and rollout.max(axis=(1, 2)) == pytest.approx([1, 1], abs=1e-5)
    assert all(np.ptp(m) > 0.1 for m in rollout)


# ------------------------------------------------------------------------------------------- methods and state
@pytest.mark.parametrize("method", VLM_METHODS, ids=lambda m: m.__name__)
def test_every_method_runs_at_batch_1_and_2(tiny, method):
    """README's method table: each method on decoder layer 1 at batch 2 and on vision block 1 at batch 1
    (AblationCAM: decoder layers only, refused on a vision block with the model intact)."""
    wrapper = wrap(tiny)
    check_method_on_decoder_and_vision(method, tiny[0], wrapper, wrapper.preprocess(random_image(50, 90, seed=10)),
                                       wrapper.decoder_layers[1], "vision blocks and the projector are not supported")


def test_fullgrad_raises_its_documented_error(tiny):
    wrapper = wrap(tiny)
    assert_fullgrad_refused(wrapper, wrapper.preprocess(random_image(50, 90)))


def test_the_projector_is_an_explain_candidate(tiny):
    wrapper = wrap(tiny)
    assert_projector_candidate(wrapper, wrapper.projector, wrapper.preprocess(random_image(50, 90)))


def test_model_state_restored_after_call_and_after_exception(tiny):
    model = tiny[0]
    with partly_frozen_in_train_mode(model, model.model.vision_tower):
        wrapper = wrap(tiny)
        layers = [wrapper.decoder_layers[0], wrapper.vision_blocks[1], wrapper.projector]
        assert_state_kept_through_gradcam(model, wrapper, wrapper.preprocess(random_image(50, 90)), layers)


# ------------------------------------------------------------------------------------------- keys and values shared
def test_layers_end_before_the_layers_that_share_keys_and_values(tmp_path):
    """With the last 2 of 4 decoder layers reusing earlier keys and values (as E2B/E4B do), the logits still equal
    the processor path; layers (and the CLI's layer count) are the first 2, the second of them blank with the
    warning; a shared layer's output (computed at the last position only) is refused with what to use."""
    model, processor = build_tiny_gemma4(tmp_path, num_kv_shared_layers=2)
    config, family = model_config(str(tmp_path))
    wrapper = Gemma4Wrapper(model, processor, prompt=PROMPT)
    image = random_image(50, 90, seed=2)
    x = wrapper.preprocess(image)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), model(**processor_inputs(processor, image)).logits[:, -1], atol=1e-5,
                                   rtol=0)
    assert wrapper.layers == wrapper.decoder_layers[:2] and layer_count(config, family) == 2
    with GradCAM(model=wrapper, target_layers=[wrapper.layers[0]], reshape_transform=wrapper.reshape_transform) as cam:
        assert cam(input_tensor=x, targets=None).max() == pytest.approx(1, abs=1e-5)
    with pytest.warns(UserWarning, match=r"decoder_layers\[0\]"):
        with GradCAM(model=wrapper, target_layers=[wrapper.layers[1]], reshape_transform=wrapper.reshape_transform) as cam:
            assert cam(input_tensor=x, targets=None).max() == 0
    with pytest.raises(ValueError, match="before the layers that share keys and values"), pytest.warns(UserWarning):
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[3]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            cam(input_tensor=x, targets=None)
    assert model_state(model)["hooks"] == 0


# ------------------------------------------------------------------------------------------- image frame, answers
@pytest.mark.parametrize("size", [(50, 90), (130, 40)])
def test_image_frame_puts_the_input_back_on_the_picture(tiny, size):
    """image_frame: a white dot on a black picture, through the processor's resize, lands (as the input's brightness
    carried back by the frame) within half a token cell of where it was on the picture."""
    wrapper = wrap(tiny)
    image = np.zeros(size + (3,), np.uint8)
    y0, x0 = size[0] // 3, 2 * size[1] // 3
    image[y0 - 1:y0 + 2, x0 - 1:x0 + 2] = 255
    x = wrapper.preprocess(image)
    frame = wrapper.image_frame(size, tuple(x.shape[2:]))
    back = frame.to_image(x[0].mean(0).numpy())
    assert back.shape == size and not np.isnan(back).any()
    y, x_ = np.unravel_index(np.argmax(back), size)
    half_cell = 0.5 * CELL * max(size[0] / x.shape[2], size[1] / x.shape[3])
    assert abs(y - y0) <= half_cell and abs(x_ - x0) <= half_cell


def test_per_token_maps_follow_the_processor_path(tiny):
    """explain_generated: the generated tokens are the processor path's greedy ones (image tokens suppressed), each
    token's probability is the processor path's with the tokens before it appended (1e-5: the same inputs), and the
    first token's map is GradCAM of its logit."""
    from pytorch_grad_cam_vlm import explain_generated
    from pytorch_grad_cam_vlm.models.answer_text import vision_token_ids

    model, processor, _ = tiny
    wrapper = wrap(tiny)
    image = shapes_image(60, 90, seed=3)
    x = wrapper.preprocess(image)
    layer = wrapper.decoder_layers[1]
    result = explain_generated(wrapper, x, [layer], max_new_tokens=3, generate_kwargs=dict(min_new_tokens=3))
    assert wrapper.answer is None
    inputs = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt")
    assert processor.tokenizer.convert_tokens_to_ids("<|image|>") in vision_token_ids(processor.tokenizer)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                  suppress_tokens=vision_token_ids(processor.tokenizer))
        generated = expected[0, inputs["input_ids"].shape[1]:]
        assert result.token_ids == generated.tolist()
        for t, token in enumerate(result.token_ids):
            ids = generated[None, :t]
            step = dict(inputs, input_ids=torch.cat([inputs["input_ids"], ids], 1),
                        attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(ids)], 1),
                        mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1))
            logits = model(**step).logits[0, -1]
            assert result.probabilities[t] == pytest.approx(float(logits.softmax(-1)[token]), abs=1e-5)
    with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform) as cam:
        first = cam(input_tensor=x, targets=[ClassifierOutputTarget(result.token_ids[0])])[0]
    np.testing.assert_allclose(result.maps[0], first, atol=1e-5)


# ------------------------------------------------------------------------------------------- explain, registry, CLI
def test_explain_returns_a_map_of_the_input_size(tiny):
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(50, 90, seed=12))
    result = explain(wrapper, x)
    assert result.maps.shape == (1,) + tuple(x.shape[2:]) and result.maps.dtype == np.float32
    assert result.candidate_layers == ["projector", 0, 1, 2] and result.methods[0] in AUTO_METHODS
    m, l = result.candidate_methods.index(result.methods[0]), result.candidate_layers.index(result.layers[0])
    np.testing.assert_array_equal(result.maps[0], result.candidate_maps[0, m, l])


def test_cli_explain_writes_maps_and_report(tiny, tmp_path, capsys):
    _, _, folder = tiny
    Image.fromarray(random_image(70, 40, seed=13)).save(tmp_path / "image.png")
    check_cli_explain(folder, "gemma4", Gemma4Wrapper, tmp_path / "image.png", tmp_path, capsys)


def test_benchmark_and_explorer_run_on_a_saved_checkpoint(tiny, tmp_path):
    """The benchmark on the checkpoint folder: a box over the whole picture holds all of the map's energy (its
    pointing hit), one over its left half part of it. The explorer's explain function (no browser), single map and
    per token, on the vision encoder and the decoder: maps of the picture's size."""
    import csv
    import json

    from pytorch_grad_cam_vlm import cli
    from pytorch_grad_cam_vlm.cli.explorer import Explorer, Request, explain_request

    model, processor, folder = tiny
    Image.fromarray(shapes_image(70, 100, seed=5)).save(tmp_path / "im0.png")
    with open(tmp_path / "data.jsonl", "w") as f:
        f.write(json.dumps(dict(image="im0.png", prompt=PROMPT, boxes=[[0, 0, 100, 70]])) + "\n")
        f.write(json.dumps(dict(image="im0.png", prompt=PROMPT, boxes=[[0, 0, 50, 70]],
                                distractor_boxes=[[50, 0, 100, 70]])) + "\n")
    out = tmp_path / "bench"
    assert cli.main(["benchmark", "--model", folder, "--data", str(tmp_path / "data.jsonl"), "--out", str(out),
                     "--layers", "1", "--methods", "GradCAM", "--percentiles", "10,60"]) == 0
    with open(out / "per_sample.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["method"] == "GradCAM"]
    whole, half = sorted(rows, key=lambda row: int(row["sample"]))
    assert whole["pointing"] == "1" and float(whole["energy"]) == pytest.approx(1.0, abs=1e-6)
    assert 0 < float(half["energy"]) < 1
    explorer = Explorer(model, processor, "gemma4", "tiny", str(tmp_path / "explorer"))
    picture = (70, 100)  # the explorer gives maps on the user's picture, not on the model's canvas
    assert tuple(wrap(tiny).preprocess(str(tmp_path / "im0.png")).shape[2:]) != picture
    for target, per_token in (("vision encoder", False), ("decoder", True)):
        result = explain_request(explorer, Request(str(tmp_path / "im0.png"), PROMPT, method="GradCAM",
                                                   target=target, per_token=per_token, max_new_tokens=2))
        assert result["map"].shape == picture and result["rgb"].shape[:2] == picture
        if per_token:
            assert result["token_maps"].shape == (len(result["tokens"]),) + picture
    assert model_state(model)["hooks"] == 0


@pytest.mark.parametrize("device", DEVICES[1:], indirect=True)
def test_logits_and_maps_on_cuda_equal_the_cpu(tiny, device, to_device):
    """The same input on CUDA (a copy of the model there): next-token logits and GradCAM at decoder layer 1 and at
    the projector equal the CPU's to 1e-4 (float32, TF32 off). Skipped without CUDA."""
    model, processor, folder = tiny
    _, family = model_config(folder)
    wrapper = make_subject(family, model, processor, PROMPT, None).wrapper
    x = wrapper.preprocess(Image.fromarray(shapes_image(60, 90, seed=3)))
    on_device = make_subject(family, to_device(model, device), processor, PROMPT, None).wrapper
    results = []
    for w, images in ((wrapper, x), (on_device, x.to(device))):
        with torch.no_grad():
            logits = w(images)[0].float().cpu()
        target = [ClassifierOutputTarget(int(logits.argmax()))]
        maps = []
        for layer in (w.decoder_layers[1], w.projector):
            with GradCAM(model=w, target_layers=[layer], reshape_transform=w.reshape_transform) as cam:
                maps.append(cam(input_tensor=images, targets=target))
        results.append((logits, maps))
    (cpu_logits, cpu_maps), (cuda_logits, cuda_maps) = results
    torch.testing.assert_close(cuda_logits, cpu_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.stack(cuda_maps), np.stack(cpu_maps), atol=1e-4)
