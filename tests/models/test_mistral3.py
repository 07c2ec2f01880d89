"""Mistral3Wrapper on a tiny Mistral 3 (Pixtral tower, 2x2 patch merger): QwenVLWrapper's contract, checked against
the processor path, exact token geometry with [IMG_BREAK] rows, and Grad-CAM by hand."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import (DEVICES, PROMPT, VLM_METHODS, assert_fullgrad_refused, assert_projector_candidate,
                      assert_state_kept_through_gradcam, check_cli_explain, check_method_on_decoder_and_vision,
                      hidden_and_grad, model_state, partly_frozen_in_train_mode, random_image)
from test_llava import change_maps, gradcam_by_hand, pipeline, shapes_image
from pytorch_grad_cam_vlm import AttentionMap, AttentionRollout, Mistral3Wrapper, build_tiny_mistral3, explain
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS

CELL = 8  # one image token: 2x2 patches of 4 px
SIZES = [(48, 48), (40, 70), (100, 30), (200, 130)]  # square, landscape, portrait, shrunk to the longest edge


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, processor, folder) of a tiny random Mistral 3 saved and loaded back (see models/tiny/mistral3.py). Seed
    1: on random weights some methods give blank maps where the channel weights come out negative (seed 0: HiResCAM
    at decoder layer 1, AblationCAM at layer 0, on the method test's picture)."""
    folder = tmp_path_factory.mktemp("tiny_mistral3")
    model, processor = build_tiny_mistral3(folder, seed=1)
    return model, processor, str(folder)


def wrap(tiny, **kwargs):
    return Mistral3Wrapper(tiny[0], tiny[1], prompt=PROMPT, **kwargs)


def processor_inputs(processor, images):
    """The reference path: the processor's chat template tokenized with the images (one <s>), one prompt each."""
    rows = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                      {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt") for image in images]
    return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}


def image_tokens(processor, input_ids):
    return (input_ids[0] == processor.tokenizer.convert_tokens_to_ids("[IMG]")).nonzero().flatten()


# ------------------------------------------------------------------------------------------- inputs and logits
@pytest.mark.parametrize("size", SIZES)
def test_logits_equal_processor_path(tiny, size):
    """The wrapper feeds the processor's exact inputs (pixels, input_ids with one <s>, [IMG_BREAK] after each row
    but the last, [IMG_END]): logits to 1e-5."""
    model, processor, _ = tiny
    image = shapes_image(*size, seed=1)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    inputs = processor_inputs(processor, [image])
    assert torch.equal(x, inputs["pixel_values"]) and x.shape[2] % CELL == 0 and x.shape[3] % CELL == 0
    assert max(x.shape[2:]) <= 64 and tuple(inputs["image_sizes"][0].tolist()) == tuple(x.shape[2:])
    built = wrapper.model_inputs(x)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(built[key], inputs[key]), key
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    rows, cols = x.shape[2] // CELL, x.shape[3] // CELL
    image_part = "".join(tokens[tokens.index("[IMG]"):tokens.index("[IMG_END]") + 1])
    assert tokens.count("<s>") == 1 and image_part == ("[IMG]" * cols + "[IMG_BREAK]") * (rows - 1) + "[IMG]" * cols \
        + "[IMG_END]"
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        logits = wrapper(x)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape == (1, len(processor.tokenizer))
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_answer_score_equals_processor_path(tiny):
    model, processor, _ = tiny
    image = shapes_image(40, 70, seed=3)
    wrapper = wrap(tiny, answer=" red circle")
    x = wrapper.preprocess(image)
    inputs = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt")
    answer = wrapper.layout_for(*x.shape[2:]).answer_ids
    assert processor.tokenizer.convert_ids_to_tokens(answer) == ["▁red", "▁circle"]
    with torch.no_grad():
        log_probs = model(**inputs).logits[0, -len(answer) - 1:-1].log_softmax(-1)
        score = wrapper(x)
    expected = log_probs.gather(-1, answer[:, None]).sum()
    assert score.shape == (1, 1)
    torch.testing.assert_close(score[0, 0], expected, atol=1e-5, rtol=0)


def test_refusals(tiny):
    """Inputs the processor would resize (over the longest edge), off the token grid, prompts that place images."""
    wrapper = wrap(tiny)
    with pytest.raises(ValueError, match="resizes 80x40 images to 64x32.*longest_edge is 64"):
        wrapper(torch.zeros(1, 3, 80, 40))
    with pytest.raises(ValueError, match="multiples of 8 pixels"):
        wrapper(torch.zeros(1, 3, 44, 40))
    with pytest.raises(ValueError, match="inserts the image"):
        Mistral3Wrapper(tiny[0], tiny[1], prompt="[IMG] What is this?")


# ------------------------------------------------------------------------------------------- the grid
def local_copy(model):
    """The model with the vision attention's output projections zeroed: each patch's features then come from its
    own pixels only (patch conv, norms, MLPs and the 2x2 merger are local), so a change of one token cell reaches
    exactly that cell's image token."""
    local = copy.deepcopy(model)
    with torch.no_grad():
        for layer in local.model.vision_tower.transformer.layers:
            layer.attention.o_proj.weight.zero_()
    return local


@pytest.mark.parametrize("size", [(40, 70), (100, 30), (48, 48)])
def test_one_changed_cell_changes_exactly_its_own_token(tiny, size):
    """Raise one 8-pixel cell of the input: the projector's rows and the decoder's input embeddings change exactly at
    the token reshape_transform puts on that cell (on the model whose patches do not mix); the [IMG_BREAK],
    [IMG_END] and text embeddings never change."""
    model, processor, _ = tiny
    local = local_copy(model)
    wrapper = Mistral3Wrapper(local, processor, prompt=PROMPT)
    check_cells_change_exactly(wrapper, local.model.language_model.layers[0], random_image(*size, seed=4), CELL)


def check_cells_change_exactly(wrapper, first_decoder_layer, picture, cell):
    """Raise each ``cell``-pixel token cell of the picture's input in turn (one batch): the projector's output and
    the first decoder layer's input change exactly at the token reshape_transform puts on that cell, and nowhere
    else in the sequence."""
    x = wrapper.preprocess(picture)
    rows, cols = x.shape[2] // cell, x.shape[3] // cell
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    regions = [(cell * r, cell * r + cell, cell * c, cell * c + cell) for r, c in cells]
    projector = change_maps(wrapper, wrapper.projector, x, regions)
    store = {}
    handle = first_decoder_layer.register_forward_pre_hook(
        lambda m, args, kwargs: store.__setitem__("input", kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    batch = x.repeat(len(regions) + 1, 1, 1, 1)
    for k, (y0, y1, x0, x1) in enumerate(regions):
        batch[k + 1, :, y0:y1, x0:x1] += 1.0
    with torch.no_grad():
        wrapper(batch)
    handle.remove()
    embeddings = store["input"]
    grids = wrapper.reshape_transform(embeddings)
    decoder = (grids[1:] - grids[:1]).norm(dim=1)
    expected = torch.zeros(len(cells), rows, cols, dtype=torch.bool)
    for k, (r, c) in enumerate(cells):
        expected[k, r, c] = True
    for name, change in (("projector", projector), ("decoder input", decoder)):
        assert change.shape == expected.shape and torch.equal(change > 0, expected), name
    others = torch.ones(embeddings.shape[1], dtype=torch.bool)
    others[wrapper.layout.vision_positions] = False
    assert torch.equal(embeddings[1:, others], embeddings[:1, others].expand(len(cells), -1, -1))


def test_one_changed_cell_moves_its_own_cell_most(tiny):
    """On the model as it is (patches mix in attention): decoder layer 0 and vision block 0 change most at the
    changed cell (a token cell of 8 px; a patch of 4 px)."""
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(40, 70, seed=5))
    for layer, cell in ((wrapper.decoder_layers[0], CELL), (wrapper.vision_blocks[0], CELL // 2)):
        rows, cols = x.shape[2] // cell, x.shape[3] // cell
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        change = change_maps(wrapper, layer, x, [(cell * r, cell * r + cell, cell * c, cell * c + cell)
                                                  for r, c in cells])
        assert [divmod(int(i), cols) for i in change.flatten(1).argmax(1)] == cells


def test_vision_feature_layer_selects_the_blocks(tmp_path):
    """A checkpoint whose projector reads the second-to-last vision block: the last block reaches nothing and is
    not offered; logits still equal the processor path."""
    model, processor = build_tiny_mistral3(tmp_path, seed=2, vision_layers=3, vision_feature_layer=-2)
    wrapper = Mistral3Wrapper(model, processor, prompt=PROMPT)
    assert wrapper.vision_blocks == list(model.model.vision_tower.transformer.layers)[:2]
    image = random_image(40, 70, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(wrapper.preprocess(image)),
                                   model(**processor_inputs(processor, [image])).logits[:, -1], atol=1e-5, rtol=0)


def test_image_frame_carries_the_input_onto_the_picture(tiny):
    check_frame_is_a_resize(wrap(tiny), [(40, 70), (200, 130)])


def check_frame_is_a_resize(wrapper, sizes):
    """The processor stretches the picture onto the input (aspect kept up to the rounding to whole cells): the
    input's own pixels, carried back with image_frame, are the picture's (smooth picture, to a few grey levels)."""
    for size in sizes:
        picture = shapes_image(*size, seed=7)
        x = wrapper.preprocess(picture)
        back = wrapper.image_frame(size, tuple(x.shape[2:])).to_image(wrapper.to_rgb(x)[0].transpose(2, 0, 1))
        assert back.shape == (3,) + size
        assert np.median(np.abs(back.transpose(1, 2, 0) - picture / 255.0)) < 0.02, size


# ------------------------------------------------------------------------------------------- Grad-CAM by hand
@pytest.mark.parametrize("where", ["decoder", "vision_block", "projector"])
def test_gradcam_equals_direct_computation_with_and_without_graph_start(tiny, where):
    """Decoder layer 1 at the [IMG] positions, vision block 0 (patch grid) and the projector (token grid), by hand on
    the raw model with the processor's inputs; equal with the graph started at the layer and with the whole graph."""
    model, processor, _ = tiny
    image = random_image(40, 70, seed=8)
    inputs = processor_inputs(processor, [image])
    layer = {"decoder": model.model.language_model.layers[1], "vision_block": model.model.vision_tower.transformer
             .layers[0], "projector": model.model.multi_modal_projector}[where]
    hidden, grad, target = hidden_and_grad(model, inputs, layer)
    rows, cols = 40 // CELL, 64 // CELL
    if where == "decoder":
        positions = image_tokens(processor, inputs["input_ids"])
        hidden, grad = hidden[0, positions], grad[0, positions]
    elif where == "vision_block":
        hidden, grad, rows, cols = hidden[0], grad[0], 2 * rows, 2 * cols
    activations, grads = (t.T.reshape(-1, rows, cols) for t in (hidden, grad))
    expected = pipeline(torch.relu(gradcam_by_hand(activations, grads)).numpy(), torch.zeros(1, 3, 40, 64))
    for efficient in (True, False):
        wrapper = wrap(tiny, efficient_gradients=efficient)
        target_layer = {"decoder": wrapper.decoder_layers[1], "vision_block": wrapper.vision_blocks[0],
                        "projector": wrapper.projector}[where]
        with GradCAM(model=wrapper, target_layers=[target_layer], reshape_transform=wrapper.reshape_transform) as cam:
            maps = cam(input_tensor=wrapper.preprocess(image), targets=[ClassifierOutputTarget(target)])
        model.zero_grad(set_to_none=True)  # without efficient gradients, grad-cam's backward fills weight gradients
        assert maps.shape == (1, 40, 64) and maps.max() == pytest.approx(1, abs=1e-5)
        np.testing.assert_allclose(maps, expected, atol=1e-5, err_msg=f"efficient_gradients={efficient}")


@pytest.mark.parametrize("device", DEVICES)
def test_batch_of_two_gradcam_equals_direct_computation(tiny, device, to_device):
    """Two pictures in one batch (one vision sequence, each image attending to itself): grad-cam's maps at decoder
    layer 1 and vision block 1 equal those by hand on the processor's batch of both; on CUDA as on the CPU."""
    model, processor, _ = tiny
    model = to_device(model, device)
    images = [random_image(100, 30, seed=s) for s in (9, 10)]
    inputs = {k: v.to(device) for k, v in processor_inputs(processor, images).items()}
    wrapper = Mistral3Wrapper(model, processor, prompt=PROMPT)
    x = torch.cat([wrapper.preprocess(image) for image in images]).to(device)
    assert torch.equal(x, inputs["pixel_values"]) and x.shape == (2, 3, 64, 24)
    for layer, target_layer, cell in ((model.model.language_model.layers[1], wrapper.decoder_layers[1], CELL),
                                      (model.model.vision_tower.transformer.layers[1], wrapper.vision_blocks[1], 4)):
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
        rows, cols = 64 // cell, 24 // cell
        if cell == CELL:
            positions = image_tokens(processor, inputs["input_ids"].cpu())
            hidden, grad = hidden[:, positions], grad[:, positions]
        else:
            hidden, grad = hidden.reshape(2, rows * cols, -1), grad.reshape(2, rows * cols, -1)
        expected = np.concatenate([pipeline(torch.relu(gradcam_by_hand(h.T.reshape(-1, rows, cols),
                                                                       g.T.reshape(-1, rows, cols))).numpy(), x)
                                   for h, g in zip(hidden, grad)])
        with GradCAM(model=wrapper, target_layers=[target_layer], reshape_transform=wrapper.reshape_transform) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        np.testing.assert_allclose(maps, expected, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(wrapper(x), model(**inputs).logits[:, -1].float(), atol=1e-5, rtol=0)


def test_last_decoder_layer_is_blank_and_warns(tiny):
    wrapper = wrap(tiny)
    x = wrapper.preprocess(random_image(40, 70))
    with pytest.warns(UserWarning, match=r"decoder_layers\[-2\] \(layer 2\)"):
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[-1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            assert cam(input_tensor=x, targets=None).max() == 0


# ------------------------------------------------------------------------------------------- attention
def test_attention_map_equals_output_attentions(tiny):
    """AttentionMap on decoder layer 1 equals the last position's head-mean attention to the [IMG] tokens read from
    output_attentions, placed on the token grid by hand; AttentionRollout gives maps of the input size."""
    model, processor, _ = tiny
    image = random_image(100, 30, seed=11)
    wrapper = wrap(tiny)
    x = wrapper.preprocess(image)
    inputs = processor_inputs(processor, [image])
    with wrapper.eager_attention(), torch.no_grad():
        row = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)
    expected = row[image_tokens(processor, inputs["input_ids"])].reshape(64 // CELL, 24 // CELL).numpy()
    with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[1]]) as cam:
        maps = cam(input_tensor=x, targets=None)
    np.testing.assert_allclose(maps, pipeline(expected, x), atol=1e-5)
    with AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers) as cam:
        rollout = cam(input_tensor=torch.cat([x, x.flip(3)]), targets=None)
    assert rollout.shape == (2, 64, 24) and rollout.max(axis=(1, 2)) == pytest.approx([1, 1], abs=1e-5)
    assert all(np.ptp(m) > 0.1 for m in rollout)


# ------------------------------------------------------------------------------------------- methods and state
@pytest.mark.parametrize("method", VLM_METHODS, ids=lambda m: m.__name__)
def test_every_method_runs_at_batch_1_and_2(tiny, method):
    """README's method table: each method on decoder layer 1 at batch 2 and on vision block 1 at batch 1
    (AblationCAM: decoder layers only, refused on a vision block with the model intact)."""
    model, _, _ = tiny
    wrapper = wrap(tiny)
    check_method_on_decoder_and_vision(method, model, wrapper, wrapper.preprocess(shapes_image(40, 70, seed=12)),
                                       wrapper.decoder_layers[1], "vision blocks and the projector are not supported")


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
        assert_state_kept_through_gradcam(model, wrapper, wrapper.preprocess(random_image(100, 30)), layers)


# ------------------------------------------------------------------------------------------- auto, registry and CLI
def test_explain_returns_a_map_of_the_input_size(tiny):
    check_explain(wrap(tiny), shapes_image(40, 70, seed=13))


def check_explain(wrapper, picture):
    """explain() on the picture: one map of the input's size, chosen among the projector and the decoder layers."""
    x = wrapper.preprocess(picture)
    result = explain(wrapper, x)
    assert result.maps.shape == (1,) + tuple(x.shape[2:]) and result.maps.dtype == np.float32
    assert result.candidate_layers == ["projector", 0, 1, 2] and result.methods[0] in AUTO_METHODS
    m, l = result.candidate_methods.index(result.methods[0]), result.candidate_layers.index(result.layers[0])
    np.testing.assert_array_equal(result.maps[0], result.candidate_maps[0, m, l])


def test_cli_explain_writes_maps_and_report(tiny, tmp_path, capsys):
    _, _, folder = tiny
    Image.fromarray(random_image(70, 40, seed=14)).save(tmp_path / "image.png")
    x = check_cli_explain(folder, "mistral3", Mistral3Wrapper, tmp_path / "image.png", tmp_path, capsys)
    assert x.shape[2:] == (64, 40)


def check_per_token(wrapper, model, processor, image):
    """explain_generated: the generated tokens are the processor path's greedy ones (image tokens suppressed), each
    token's probability the processor path's with the tokens before it appended (1e-5: the same inputs), and the
    first token's map GradCAM of its logit."""
    from pytorch_grad_cam_vlm import explain_generated
    from pytorch_grad_cam_vlm.models.answer_text import vision_token_ids

    x = wrapper.preprocess(image)
    layer = wrapper.decoder_layers[1]
    result = explain_generated(wrapper, x, [layer], max_new_tokens=3, generate_kwargs=dict(min_new_tokens=3))
    assert wrapper.answer is None
    inputs = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                  suppress_tokens=vision_token_ids(processor.tokenizer))
        generated = expected[0, inputs["input_ids"].shape[1]:]
        assert result.token_ids == generated.tolist()
        for t, token in enumerate(result.token_ids):
            ids = generated[None, :t]
            appended = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            step = {k: torch.cat([v, appended.get(k, torch.zeros_like(ids))], 1) if v.dim() == 2 and
                    v.shape[1] == inputs["input_ids"].shape[1] else v for k, v in inputs.items()}
            logits = model(**step).logits[0, -1]
            assert result.probabilities[t] == pytest.approx(float(logits.softmax(-1)[token]), abs=1e-5)
    with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform) as cam:
        first = cam(input_tensor=x, targets=[ClassifierOutputTarget(result.token_ids[0])])[0]
    np.testing.assert_allclose(result.maps[0], first, atol=1e-5)


def check_benchmark_and_explorer(model, processor, family, folder, tmp_path):
    """The benchmark on the checkpoint folder: a box over the whole picture holds all of the map's energy (its
    pointing hit), one over its left half part of it. The explorer's explain function (no browser), single map and
    per token: maps of the picture's size; the model left without hooks."""
    import csv
    import json

    from pytorch_grad_cam_vlm import cli
    from pytorch_grad_cam_vlm.cli.explorer import Explorer, Request, explain_request

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
    explorer = Explorer(model, processor, family, "tiny", str(tmp_path / "explorer"))
    picture = (70, 100)  # the explorer's maps lie on the picture, carried there by the wrapper's image_frame
    for target, per_token in (("vision encoder", False), ("decoder", True)):
        result = explain_request(explorer, Request(str(tmp_path / "im0.png"), PROMPT, method="GradCAM",
                                                   target=target, per_token=per_token, max_new_tokens=2))
        assert result["map"].shape == picture and result["rgb"].shape[:2] == picture
        if per_token:
            assert result["token_maps"].shape == (len(result["tokens"]),) + picture
    assert model_state(model)["hooks"] == 0


def test_per_token_maps_follow_the_processor_path(tiny):
    check_per_token(wrap(tiny), tiny[0], tiny[1], shapes_image(40, 70, seed=15))


def test_benchmark_and_explorer_run_on_a_saved_checkpoint(tiny, tmp_path):
    model, processor, folder = tiny
    check_benchmark_and_explorer(model, processor, "mistral3", folder, tmp_path)
