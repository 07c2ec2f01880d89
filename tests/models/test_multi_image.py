"""Several images in one prompt (Qwen2.5-VL, Qwen3-VL): the canvas's logits equal the processor's with both images,
reshape_transform puts each image's patches and tokens at its box, and the map splits between the images."""
import numpy as np
import pytest
import torch
from conftest import PROMPT, model_state, random_image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import Qwen3VLWrapper, QwenVLWrapper, build_tiny_qwen3_vl
from pytorch_grad_cam_vlm.models.multi_image import ImageBoxes, image_maps, mass_shares, side_by_side


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family(request, tiny_qwen, tmp_path_factory):
    if request.param == "qwen2_5_vl":
        return (*tiny_qwen, QwenVLWrapper)
    return (*build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3"), seed=0), Qwen3VLWrapper)


def two_images(cell):
    """A wide image and a tall one, two and three token cells high."""
    return random_image(2 * cell, 3 * cell, seed=1), random_image(3 * cell, 2 * cell, seed=2)


def processor_logits(processor, model, images, answer=""):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text + answer], images=list(images), return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0]


@pytest.mark.parametrize("answer", [None, "red circle"])
def test_logits_equal_the_processor_path_with_both_images(family, answer):
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT, answer=answer)
    images = two_images(wrapper.token_cell)
    x = wrapper.preprocess(list(images))
    c = wrapper.token_cell
    assert x.shape == (1, 3, 3 * c, 5 * c)
    assert wrapper.image_boxes == ImageBoxes(((0, 0, 2 * c, 3 * c), (0, 3 * c, 3 * c, 2 * c)))
    with torch.no_grad():
        output = wrapper(x.repeat(2, 1, 1, 1))
    reference = processor_logits(processor, model, images, answer or "")
    if answer is None:
        np.testing.assert_allclose(output[1].numpy(), reference[-1].numpy(), atol=1e-5)
    else:
        ids = wrapper.layout.answer_ids
        expected = torch.log_softmax(reference[-len(ids) - 1:-1], -1).gather(-1, ids[:, None]).sum()
        np.testing.assert_allclose(float(output[1, 0]), float(expected), atol=1e-5)
    np.testing.assert_allclose(output[0].numpy(), output[1].numpy(), atol=1e-6)


def test_one_cell_of_image_2_changes_only_that_cell_of_image_2s_map(family):
    """Perturb one token cell of image 2: the first vision block's input (patch embeddings, in the encoder's order)
    changes only at the patches that reshape_transform puts on that cell of image 2's box."""
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    c, p = wrapper.token_cell, wrapper.patch_size
    x = wrapper.preprocess(list(two_images(c)))
    top, left = wrapper.image_boxes.boxes[1][:2]
    row, col = 2, 1  # the cell of image 2
    perturbed = x.clone()
    perturbed[:, :, top + row * c:top + (row + 1) * c, left + col * c:left + (col + 1) * c] += 0.5
    seen = []
    handle = wrapper.vision_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            wrapper(x), wrapper(perturbed)
    finally:
        handle.remove()
    grids = [wrapper.reshape_transform(hidden) for hidden in seen]  # (1, C, H / p, W / p)
    changed = (grids[1] - grids[0]).abs().amax(1)[0] > 1e-6
    expected = torch.zeros_like(changed)
    m = wrapper.merge_size
    expected[(top + row * c) // p:(top + row * c) // p + m, (left + col * c) // p:(left + col * c) // p + m] = True
    assert torch.equal(changed, expected)


def test_decoder_layers_and_merger_put_each_images_tokens_at_its_box(family):
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    c = wrapper.token_cell
    x = wrapper.preprocess(list(two_images(c)))
    with torch.no_grad():
        wrapper(x)
    layout = wrapper.layout
    seq = layout.text_inputs["input_ids"].shape[1]
    positions = layout.vision_positions
    assert len(positions) == 6 + 6  # 2x3 and 3x2 token cells
    grid = wrapper.reshape_transform(torch.arange(seq, dtype=torch.float32).view(1, seq, 1))[0, 0]
    expected = torch.zeros(3, 5)
    expected[:2, :3] = positions[:6].view(2, 3).float()  # image 1, raster order, first
    expected[:, 3:] = positions[6:].view(3, 2).float()
    assert torch.equal(grid, expected)
    # the merger's rows (window order for Qwen2.5-VL): the merger's own output, placed by reshape_transform, is the
    # decoder's input at the image positions
    kept = {}

    def keep_embeds(module, args, kwargs):
        kept["embeds"] = args[0] if args else kwargs["hidden_states"]

    handles = [wrapper.merger.register_forward_hook(lambda m, a, out: kept.update(merger=out)),
               wrapper.decoder_layers[0].register_forward_pre_hook(keep_embeds, with_kwargs=True)]
    try:
        with torch.no_grad():
            wrapper(x)
    finally:
        for handle in handles:
            handle.remove()
    merger = kept["merger"][0] if isinstance(kept["merger"], tuple) else kept["merger"]
    merger = getattr(merger, "pooler_output", merger)
    np.testing.assert_allclose(wrapper.reshape_transform(merger).numpy(),
                               wrapper.reshape_transform(kept["embeds"]).numpy(), atol=1e-6)


def test_gradcam_runs_on_the_canvas_and_splits_between_the_images(family):
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    x = wrapper.preprocess(list(two_images(wrapper.token_cell)))
    before = model_state(model)
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(3)])
    assert model_state(model) == before
    first, second = image_maps(maps, wrapper.image_boxes)
    assert first.shape[1:] == (2 * wrapper.token_cell, 3 * wrapper.token_cell)
    shares = mass_shares(maps, wrapper.image_boxes)
    np.testing.assert_allclose(shares[0], [first.sum() / (first.sum() + second.sum()),
                                           second.sum() / (first.sum() + second.sum())], rtol=1e-6)


def test_boxes_and_shares_by_hand():
    boxes = side_by_side([(2, 3), (4, 1)])
    assert boxes.boxes == ((0, 0, 2, 3), (0, 3, 4, 1)) and boxes.canvas_size == (4, 4)
    maps = np.zeros((1, 4, 4))
    maps[0, :2, :3] = 1.0  # 6 in image 1
    maps[0, :, 3] = 0.5  # 2 in image 2
    maps[0, 3, 0] = 9.0  # outside both images: not counted
    np.testing.assert_allclose(mass_shares(maps, boxes), [[0.75, 0.25]])
    assert np.isnan(mass_shares(np.zeros((1, 4, 4)), boxes)).all()
    with pytest.raises(ValueError, match="got one image; pass it alone"):
        side_by_side([(2, 2)])


def test_a_canvas_of_another_size_is_refused(family):
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    c = wrapper.token_cell
    x = wrapper.preprocess(list(two_images(c)))
    with pytest.raises(ValueError, match="prepared as a canvas of .* preprocess them again"):
        wrapper(x[:, :, :, :4 * c])
    single = wrapper.preprocess(random_image(2 * c, 2 * c))  # one image again: the canvas is forgotten
    assert wrapper.image_boxes is None and wrapper(single).shape[0] == 1
