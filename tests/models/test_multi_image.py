"""Several images in one prompt (Qwen2.5-VL, Qwen3-VL, GLM-4V, Gemma 3, InternVL, SmolVLM, LLaVA): the canvas's logits
equal the processor's with both images, reshape_transform puts each image's patches and tokens at its box, the map
splits between the images (explain's split: each image's share and its own deletion check), and bad input gets one
clear error."""
import cv2
import numpy as np
import pytest
import torch
from conftest import (PROMPT, VLM_METHODS, changed_cells, check_method_on_decoder_and_vision, first_block_inputs,
                      model_state, perturb_cell, projector_and_decoder_input, random_image)
from PIL import Image
from test_idefics3 import GLOBAL_IMAGE_BOUND
from test_idefics3 import shapes_image as idefics3_image
from test_internvl import THUMBNAIL_BOUND
from test_internvl import shapes_image as internvl_image
from test_llava import BASE_IMAGE_BOUND
from test_llava import shapes_image as llava_image
from pytorch_grad_cam import AblationCAM, GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import (Explanation, Gemma3Wrapper, Glm4vWrapper, Idefics3Wrapper, ImageSplit,
                                  InternVLWrapper, LlavaWrapper, MapCheck, Mistral3Wrapper, Qwen3VLWrapper,
                                  QwenVLWrapper, build_tiny_gemma3, build_tiny_glm4v, build_tiny_idefics3,
                                  build_tiny_internvl, build_tiny_llava, build_tiny_mistral3, build_tiny_qwen3_vl,
                                  check_maps, explain)
from pytorch_grad_cam_vlm.metrics.null import NULL_MAPS
from pytorch_grad_cam_vlm.models.frame import ImageFrame
from pytorch_grad_cam_vlm.models.multi_image import (ImageBoxes, MultiImage, box_masks, image_maps, mass_shares,
                                                     side_by_side)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "glm4v"])
def family(request, tiny_qwen, tmp_path_factory):
    if request.param == "qwen2_5_vl":
        return (*tiny_qwen, QwenVLWrapper)
    if request.param == "glm4v":
        return (*build_tiny_glm4v(tmp_path_factory.mktemp("glm4v"), seed=0), Glm4vWrapper)
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
    changed = changed_cells(wrapper, *first_block_inputs(wrapper, x, perturb_cell(x, top, left, row, col, c)))
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
    merger, embeds = projector_and_decoder_input(wrapper, x)
    np.testing.assert_allclose(merger.numpy(), embeds.numpy(), atol=1e-6)


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


@pytest.mark.parametrize("method", VLM_METHODS, ids=lambda m: m.__name__)
def test_every_gradcam_method_runs_on_the_canvas_of_two_images(method, tiny_qwen):
    """grad-cam's methods take the canvas as any input: the wrapper's layout holds both images' tokens, so the
    gradient methods, the score methods and AblationCAM's token ablation need nothing more."""
    model, processor = tiny_qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    x = wrapper.preprocess(list(two_images(wrapper.token_cell)))
    check_method_on_decoder_and_vision(method, model, wrapper, x, wrapper.decoder_layers[2],
                                       "vision blocks and mergers are not supported")


def test_ablationcam_on_the_canvas_equals_ablating_each_channel_at_both_images_tokens_by_hand(family):
    """AblationCAM's weights on two images: the target's relative drop when one channel of the decoder layer's
    output is zeroed at every image token of both images (grad-cam's formula), the map the weighted channels."""
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    x = wrapper.preprocess(list(two_images(wrapper.token_cell)))
    layer, target = wrapper.decoder_layers[1], ClassifierOutputTarget(3)
    with AblationCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform,
                     ablation_layer=wrapper.ablation_layer()) as cam:
        maps = cam(input_tensor=x, targets=[target])
    kept = {}
    handle = layer.register_forward_hook(lambda module, args, output: kept.setdefault("hidden", output[0]
                                         if isinstance(output, tuple) else output))
    with torch.no_grad():
        clean = float(wrapper(x)[0, 3])
    handle.remove()
    hidden, positions = kept["hidden"].detach(), wrapper.layout.vision_positions
    drops = []
    for channel in range(hidden.shape[-1]):
        def zeroed(module, args, output, channel=channel):
            out = (output[0] if isinstance(output, tuple) else output).clone()
            out[:, positions, channel] = 0
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        handle = layer.register_forward_hook(zeroed)
        with torch.no_grad():
            drops.append((clean - float(wrapper(x)[0, 3])) / clean)
        handle.remove()
    weighted = (hidden * torch.tensor(drops).view(1, 1, -1)).sum(-1, keepdim=True)
    grid = torch.relu(wrapper.reshape_transform(weighted))[0, 0].numpy()
    expected = cv2.resize(grid, (x.shape[3], x.shape[2]))
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(maps[0], expected, atol=1e-4)
    first, second = image_maps(maps, wrapper.image_boxes)
    assert first.max() > 0 and second.max() > 0  # both images' tokens were ablated and weighted


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


# ------------------------------------------------------------------------------------------- Gemma 3
@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A tiny Gemma 3 (32-px images of 8x8 patches pooled to 4x4 tokens of 8 px), saved and loaded back."""
    model, processor = build_tiny_gemma3(tmp_path_factory.mktemp("gemma3"), seed=1)
    return Gemma3Wrapper(model, processor, prompt=PROMPT)


GEMMA_IMAGES = (random_image(40, 70, seed=1), random_image(90, 50, seed=2))  # each resized to the 32-px square


def gemma3_reference(wrapper, images, answer=""):
    """The processor's own inputs for both images in one prompt (its chat template, one <bos>, token_type_ids)."""
    content = [{"type": "image", "image": Image.fromarray(image)} for image in images]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": PROMPT}]}]
    if answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return wrapper.processor.apply_chat_template(messages, add_generation_prompt=not answer, tokenize=True,
                                                 return_dict=True, return_tensors="pt")


def test_gemma3_logits_equal_the_processor_path_with_two_images_of_different_sizes(gemma3):
    x = gemma3.preprocess(list(GEMMA_IMAGES))
    assert x.shape == (1, 3, 32, 64) and gemma3.image_boxes == ImageBoxes(((0, 0, 32, 32), (0, 32, 32, 32)))
    inputs = gemma3_reference(gemma3, GEMMA_IMAGES)
    ours = gemma3.model_inputs(x)
    assert torch.equal(ours["input_ids"], inputs["input_ids"])
    assert torch.equal(ours["token_type_ids"], inputs["token_type_ids"])
    assert torch.equal(ours["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        reference = gemma3.model(**inputs).logits[0, -1]
        output = gemma3(x.repeat(2, 1, 1, 1))
    np.testing.assert_allclose(output[1].numpy(), reference.numpy(), atol=1e-5)
    np.testing.assert_allclose(output[0].numpy(), output[1].numpy(), atol=1e-6)


def test_gemma3_one_cell_of_image_2_changes_only_that_cell_of_image_2s_map(gemma3):
    """Perturb one token cell (8 px) of image 2: the vision tower's first block input (patch and position
    embeddings) changes only at the 2x2 patches that reshape_transform puts on that cell of image 2's square."""
    x = gemma3.preprocess(list(GEMMA_IMAGES))
    top, left = gemma3.image_boxes.boxes[1][:2]
    row, col, c, p = 2, 1, gemma3.token_cell, gemma3.patch_size
    changed = changed_cells(gemma3, *first_block_inputs(gemma3, x, perturb_cell(x, top, left, row, col, c)))
    assert changed.shape == (8, 16)  # (32 / 4, 64 / 4)
    expected = torch.zeros(8, 16, dtype=torch.bool)
    expected[(top + row * c) // p:(top + (row + 1) * c) // p, (left + col * c) // p:(left + (col + 1) * c) // p] = True
    assert torch.equal(changed, expected)


def test_gemma3_decoder_layers_put_each_images_tokens_on_its_square(gemma3):
    x = gemma3.preprocess(list(GEMMA_IMAGES))
    with torch.no_grad():
        gemma3(x)
    positions, seq = gemma3.layout.image_positions, gemma3.layout.sequence_length
    assert len(positions) == 2 * 16
    grid = gemma3.reshape_transform(torch.arange(seq, dtype=torch.float32).view(1, seq, 1))[0, 0]
    assert torch.equal(grid, torch.cat([positions[:16].view(4, 4), positions[16:].view(4, 4)], dim=1).float())


def test_gemma3_with_an_answer_scores_it_as_the_processor_with_both_images(gemma3):
    wrapper = Gemma3Wrapper(gemma3.model, gemma3.processor, prompt=PROMPT, answer="red circle")
    x = wrapper.preprocess(list(GEMMA_IMAGES))
    ids = wrapper.layout_for(32, 64).answer_ids
    inputs = gemma3_reference(wrapper, GEMMA_IMAGES, "red circle")
    start = (inputs["input_ids"][0] == ids[0]).nonzero().flatten()[-1]  # the answer's first token
    with torch.no_grad():
        logits = wrapper.model(**inputs).logits[0]
        score = float(wrapper(x)[0, 0])
    expected = torch.log_softmax(logits[start - 1:start - 1 + len(ids)], -1).gather(-1, ids[:, None]).sum()
    np.testing.assert_allclose(score, float(expected), atol=1e-5)


def test_gemma3_with_pan_and_scan_refuses_several_images(gemma3):
    wrapper = Gemma3Wrapper(gemma3.model, gemma3.processor, prompt=PROMPT, pan_and_scan=True)
    with pytest.raises(ValueError, match=r"^Several images in one prompt take Gemma 3 without pan-and-scan: create "
                                         r"the wrapper with pan_and_scan=False, or explain the images one at a "
                                         r"time\.$"):
        wrapper.preprocess(list(GEMMA_IMAGES))
    assert wrapper.image_boxes is None


# ------------------------------------------------------------------------------------------- tiled families
# Per family: its tiny builder and wrapper, pictures of other tilings, their canvases' boxes, which of the encoder's
# images are tiles (the rest: each picture's whole-picture image, after its tiles), the keyword that takes the
# processor's own whole-picture images and the wrapper's method that gives one, and the one-picture bound of the
# logits with the whole-picture images forward resizes from each canvas.
TILE = 32  # both tiny families' tile
TILED = {
    "internvl": (build_tiny_internvl, InternVLWrapper,  # 1x2 tiles and a thumbnail, 3x1 and a thumbnail, one tile
                 (internvl_image(40, 70, seed=1), internvl_image(100, 30, seed=2), internvl_image(30, 30, seed=3)),
                 ((0, 0, 32, 64), (0, 64, 96, 32), (0, 96, 32, 32)), [0, 1, 3, 4, 5, 7], "thumbnails",
                 "processor_thumbnail", THUMBNAIL_BOUND),
    "idefics3": (build_tiny_idefics3, Idefics3Wrapper,  # 2x3 tiles and a global image, 3x1 and a global image
                 (idefics3_image(40, 70, seed=1), idefics3_image(100, 30, seed=2)),
                 ((0, 0, 64, 96), (0, 96, 96, 32)), [0, 1, 2, 3, 4, 5, 7, 8, 9], "global_images",
                 "processor_global_image", GLOBAL_IMAGE_BOUND),
}


@pytest.fixture(scope="module", params=sorted(TILED))
def tiled(request, tmp_path_factory):
    """(wrapper, its family's row of TILED) of a tiny tiled model (InternVL: 32-px tiles of 8x8 patches, 4x4 tokens;
    SmolVLM: 32-px tiles of 8x8 patches), saved and loaded back."""
    build, wrapper_cls, *row = TILED[request.param]
    model, processor = build(tmp_path_factory.mktemp(request.param), seed=0)
    return wrapper_cls(model, processor, prompt=PROMPT), row


def test_tiled_logits_equal_the_processor_path_with_pictures_of_other_tilings(tiled):
    """The processor's tiles bit for bit and its tokens; with the processor's own whole-picture images the logits
    agree to 1e-5, with those forward resizes from each picture's canvas to the family's one-picture bound."""
    wrapper, (images, boxes, tiles, keyword, method, bound) = tiled
    x = wrapper.preprocess(list(images))
    assert wrapper.image_boxes == ImageBoxes(boxes)
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": PROMPT}]
    text = wrapper.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = wrapper.processor(text=[text], images=[list(images)], return_tensors="pt")
    built = wrapper.model_inputs(x)
    assert torch.equal(built["input_ids"], inputs["input_ids"])
    ours, theirs = (p.reshape(-1, 3, TILE, TILE) for p in (built["pixel_values"], inputs["pixel_values"]))
    assert len(ours) == len(theirs) and torch.equal(ours[tiles], theirs[tiles])
    wholes = [getattr(wrapper, method)(image) if (h, w) != (TILE, TILE) else None  # a one-tile picture has none
              for image, (_, _, h, w) in zip(images, boxes)]
    with torch.no_grad():
        reference = wrapper.model(**inputs).logits[0, -1]
        exact = wrapper.model(**wrapper.model_inputs(x, **{keyword: wholes})).logits[0, -1]
        logits = wrapper(x)[0]
    torch.testing.assert_close(exact, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference, atol=bound, rtol=0)


def test_tiled_one_cell_of_image_2_changes_only_that_cell_and_image_2s_whole_picture(tiled):
    """Perturb one token cell of picture 2: the first vision block's input changes, among the tiles, only at the
    patches reshape_transform puts on that cell of picture 2's box (the "tiles" view); among the whole-picture
    images (thumbnails, global images), only within picture 2's box."""
    wrapper, (images, *_) = tiled
    x = wrapper.preprocess(list(images))
    top, left, height, width = wrapper.image_boxes.boxes[1]
    row, col, c, p = 2, 0, wrapper.token_cell, wrapper.patch_size
    seen = first_block_inputs(wrapper, x, perturb_cell(x, top, left, row, col, c))
    changed = {}
    for view in wrapper.views[:2]:  # the tiles, then the whole picture
        wrapper.view = view
        changed[view] = changed_cells(wrapper, *seen)
    wrapper.view = "combined"
    expected = torch.zeros(x.shape[2] // p, x.shape[3] // p, dtype=torch.bool)
    expected[(top + row * c) // p:(top + (row + 1) * c) // p, (left + col * c) // p:(left + (col + 1) * c) // p] = True
    assert torch.equal(changed[wrapper.views[0]], expected)
    box = torch.zeros_like(expected)
    box[top // p:(top + height) // p, left // p:(left + width) // p] = True
    assert changed[wrapper.views[1]].any() and not (changed[wrapper.views[1]] & ~box).any()


def test_tiled_maps_split_on_each_pictures_own_frame(tiled):
    wrapper, (images, boxes, *_) = tiled
    result = explain(wrapper, MultiImage(images), method="GradCAM", layers="1", null=0, fractions=(0.2,))
    [split] = result.split
    assert result.maps.shape[1:] == ImageBoxes(boxes).canvas_size
    np.testing.assert_allclose(split.shares, mass_shares(result.model_maps, split.boxes)[0], rtol=1e-6)
    for image, frame, part, m in zip(images, split.frames, image_maps(result.model_maps, split.boxes), split.maps):
        assert frame == wrapper.image_frame(image.shape[:2], part.shape[1:]) and m.shape == image.shape[:2]
        np.testing.assert_allclose(m, frame.to_image(part[0]), atol=1e-6)


# ------------------------------------------------------------------------------------------- LLaVA
# Two pictures of other shapes; the canvas's boxes per family: LLaVA 1.5 center-crops each to its 32-px square;
# LLaVA-NeXT tiles each on its own pinpoint (2x2 and 3x1 tiles, a base image each); OneVision tiles only a lone
# picture, so with two the processor pads each to a square (the mean colour) and resizes it, untiled.
LLAVA_IMAGES = (llava_image(40, 70, seed=1), llava_image(100, 30, seed=2))
LLAVA_BOXES = {"llava": ((0, 0, 32, 32), (0, 32, 32, 32)), "llava_next": ((0, 0, 64, 64), (0, 64, 96, 32)),
               "llava_onevision": ((0, 0, 32, 32), (0, 32, 32, 32))}


@pytest.fixture(scope="module", params=sorted(LLAVA_BOXES))
def llava(request, tmp_path_factory):
    """(model, processor) of a tiny LLaVA family (32-px tiles of 8-px patches, 4x4 tokens), saved and loaded back."""
    return build_tiny_llava(tmp_path_factory.mktemp(request.param), family=request.param, seed=0)


@pytest.mark.parametrize("answer", [None, "red circle"])
def test_llava_logits_equal_the_processor_path_with_two_pictures(llava, answer):
    """The processor's tokens and encoder images bit for bit (LLaVA-NeXT's base images aside); the logits (or the
    answer's score) to 1e-5 where forward feeds the processor's own images (LLaVA 1.5, OneVision; NeXT given the
    processor's base images), to test_llava's BASE_IMAGE_BOUND with NeXT's base images resized from each canvas."""
    model, processor = llava
    wrapper = LlavaWrapper(model, processor, prompt=PROMPT, answer=answer)
    x = wrapper.preprocess(list(LLAVA_IMAGES))
    assert wrapper.image_boxes == ImageBoxes(LLAVA_BOXES[wrapper.family])
    content = [{"type": "image"}] * 2 + [{"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text + (answer or "")], images=[list(LLAVA_IMAGES)], return_tensors="pt")
    built = wrapper.model_inputs(x)
    assert torch.equal(built["input_ids"], inputs["input_ids"])
    counts = [p.image_count for p in wrapper.layout_for(*x.shape[2:]).pictures]
    theirs = inputs["pixel_values"] if inputs["pixel_values"].dim() == 5 else inputs["pixel_values"][:, None]
    theirs = torch.cat([images[:n] for images, n in zip(theirs, counts)])  # the processor pads NeXT's to 5 each
    ours = built["pixel_values"]
    tiled = wrapper.family == "llava_next"
    assert len(ours) == len(theirs) == sum(counts) == (9 if tiled else 2)
    kept = [i for i in range(len(ours)) if not (tiled and i in (0, counts[0]))]  # NeXT's base images come first
    assert torch.equal(ours[kept], theirs[kept])
    bases = [wrapper.processor_base_image(image) for image in LLAVA_IMAGES] if tiled else None
    with torch.no_grad():
        reference = model(**inputs).logits[0]
        exact = model(**wrapper.model_inputs(x, base_images=bases)).logits[0]
        output = wrapper(x.repeat(2, 1, 1, 1))
    if answer is None:
        expected, exact = reference[-1], exact[-1]
    else:
        ids = wrapper.layout.answer_ids
        expected, exact = (torch.log_softmax(logits[-len(ids) - 1:-1], -1).gather(-1, ids[:, None]).sum()[None]
                           for logits in (reference, exact))
    torch.testing.assert_close(exact, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(output[1], expected, atol=BASE_IMAGE_BOUND if tiled else 1e-5, rtol=0)
    torch.testing.assert_close(output[0], output[1], atol=1e-6, rtol=0)


def test_llava_one_cell_of_image_2_changes_only_that_cell_and_image_2s_base(llava):
    """Perturb one token cell of picture 2: the first vision block's input changes, in the "tiles" view, only at
    that cell of picture 2's box; in the "base" view, for a square picture (LLaVA 1.5, OneVision: its base image is
    its input) at that cell too, for a NeXT picture (base image resized from its canvas) within its box only."""
    wrapper = LlavaWrapper(*llava, prompt=PROMPT)
    x = wrapper.preprocess(list(LLAVA_IMAGES))
    top, left, height, width = wrapper.image_boxes.boxes[1]
    row, col, c = 2, 1, wrapper.token_cell
    seen = first_block_inputs(wrapper, x, perturb_cell(x, top, left, row, col, c))
    changed = {}
    for view in ("tiles", "base"):
        wrapper.view = view
        changed[view] = changed_cells(wrapper, *seen)
    expected = torch.zeros(x.shape[2] // c, x.shape[3] // c, dtype=torch.bool)
    expected[(top + row * c) // c, (left + col * c) // c] = True
    assert torch.equal(changed["tiles"], expected)
    if wrapper.family != "llava_next":
        assert torch.equal(changed["base"], expected)
    else:
        box = torch.zeros_like(expected)
        box[top // c:(top + height) // c, left // c:(left + width) // c] = True
        assert changed["base"].any() and not (changed["base"] & ~box).any()


@pytest.mark.parametrize("view", ["tiles", "base", "combined"])
def test_llava_projector_and_decoder_input_put_each_pictures_tokens_at_its_box(llava, view):
    """The projector's rows (placed from the encoder's batch) are the first decoder layer's input at the image
    positions (placed from the prompt): both views of each picture land on the same cells."""
    wrapper = LlavaWrapper(*llava, prompt=PROMPT, view=view)
    x = wrapper.preprocess(list(LLAVA_IMAGES))
    placed, embeds = projector_and_decoder_input(wrapper, x)
    torch.testing.assert_close(placed, embeds, atol=1e-6, rtol=0)
    for _, left, _, width in wrapper.image_boxes.boxes:  # every picture has tokens on its box
        assert placed[..., left // wrapper.token_cell:(left + width) // wrapper.token_cell].abs().sum() > 0


def test_llava_maps_split_on_each_pictures_own_frame(llava):
    wrapper = LlavaWrapper(*llava, prompt=PROMPT)
    before = model_state(wrapper.model)
    result = explain(wrapper, MultiImage(LLAVA_IMAGES), method="GradCAM", layers="1", null=0, fractions=(0.2,))
    assert model_state(wrapper.model) == before
    [split] = result.split
    assert result.maps.shape[1:] == ImageBoxes(LLAVA_BOXES[wrapper.family]).canvas_size
    np.testing.assert_allclose(split.shares, mass_shares(result.model_maps, split.boxes)[0], rtol=1e-6)
    np.testing.assert_allclose(split.shares.sum(), 1.0, rtol=1e-6)
    for image, frame, part, m in zip(LLAVA_IMAGES, split.frames, image_maps(result.model_maps, split.boxes),
                                     split.maps):
        assert frame == wrapper.image_frame(image.shape[:2], part.shape[1:]) and m.shape == image.shape[:2]
        np.testing.assert_allclose(m, frame.to_image(part[0]), atol=1e-6)


def test_onevision_picture_among_several_lies_where_its_frame_says(tmp_path):
    """OneVision pads a picture among several to a centered square of the mean colour and resizes it: a white 40x70
    picture's rows on its 32-px input are those the frame gives (rows 15 * 32/70 to 55 * 32/70): the processor's
    row profile above the background has that centre and width, to 0.1 px."""
    wrapper = LlavaWrapper(*build_tiny_llava(tmp_path, family="llava_onevision", seed=0), prompt=PROMPT)
    white = np.full((40, 70, 3), 255, np.uint8)
    x = wrapper.preprocess([white, random_image(30, 30)])
    frame = wrapper.image_frame((40, 70), (32, 32))
    y, h = 15 * 32 / 70, 40 * 32 / 70
    assert frame == ImageFrame.letterboxed((40, 70), (32, 32), (y, 0, h, 32))
    profile = x[0, :, :, :32].mean((0, 2)).double()
    profile = (profile - profile[0]) / (profile.max() - profile[0])  # row 0: the mean colour; the middle: white
    rows = torch.arange(32, dtype=torch.float64) + 0.5
    centre = float((profile * rows).sum() / profile.sum())
    assert abs(float(profile.sum()) - h) < 0.1 and abs(centre - (y + h / 2)) < 0.1


# ------------------------------------------------------------------------------------------- explain's split
def test_explain_splits_the_chosen_map_between_the_images_each_on_its_own_picture(gemma3):
    before = model_state(gemma3.model)
    result = explain(gemma3, MultiImage(GEMMA_IMAGES), method="GradCAM", layers="1", null=2)
    assert model_state(gemma3.model) == before and gemma3.image_boxes is not None
    unsplit = explain(gemma3, gemma3.preprocess(list(GEMMA_IMAGES)), method="GradCAM", layers="1", null=0, split=False)
    assert unsplit.split is None and np.array_equal(unsplit.model_maps, result.model_maps)
    [split] = result.split
    boxes = gemma3.image_boxes
    assert result.maps.shape == (1, 32, 64) and split.boxes == boxes
    np.testing.assert_allclose(split.shares, mass_shares(result.model_maps, boxes)[0], rtol=1e-6)
    np.testing.assert_allclose(split.shares.sum(), 1.0, rtol=1e-6)
    for image, frame, part, m in zip(GEMMA_IMAGES, split.frames, image_maps(result.model_maps, boxes), split.maps):
        assert frame == ImageFrame.resized(image.shape[:2], (32, 32)) and m.shape == image.shape[:2]
        np.testing.assert_allclose(m, frame.to_image(part[0]), atol=1e-6)
    x = gemma3.preprocess(list(GEMMA_IMAGES))
    for check, region in zip(split.checks, box_masks(boxes)):  # each image's check: the check confined to it
        [expected] = check_maps(gemma3, x, result.model_maps[0], result.targets[0], null=2, region=region,
                                clean=result.reliance[0].clean)
        assert check == expected


def test_each_images_part_of_a_random_map_carries_its_own_stability_and_the_prompt_only_verdict(gemma3):
    """RandomCAM on two images: each part's stability is its region's correlation with a by-hand second draw (here
    0.06 and 0.39, the whole map's 0.23): both parts "unstable", where before they carried none. GradCAM's parts are
    "ok"; with the image tokens zeroed the answer comes from the prompt and no part's verdict is "ok"."""
    from pytorch_grad_cam import RandomCAM

    from pytorch_grad_cam_vlm.layers import PROJECTOR, layer_modules
    from pytorch_grad_cam_vlm.metrics.sanity import pearson
    from pytorch_grad_cam_vlm.methods.sweep import layer_sweep

    target = ClassifierOutputTarget(3)
    np.random.seed(5)  # grad-cam's RandomCAM draws its weights from numpy's global generator
    result = explain(gemma3, MultiImage(GEMMA_IMAGES), [target], method="RandomCAM", layers="1", null=0)
    np.random.seed(5)
    x = gemma3.preprocess(list(GEMMA_IMAGES))
    draws = []
    for _ in range(2):
        with layer_sweep(RandomCAM)(model=gemma3, target_layers=layer_modules(gemma3, [1]),
                                    reshape_transform=gemma3.reshape_transform) as cam:
            draws.append(cam(input_tensor=x, targets=[target])[0, 0])
    np.testing.assert_array_equal(result.model_maps[0], draws[0])
    [split] = result.split
    expected = [pearson(draws[0][region], draws[1][region]) for region in box_masks(split.boxes)]
    assert [c.stability for c in split.checks] == pytest.approx(expected, abs=1e-12, nan_ok=True)
    assert result.checks[0].stability == pytest.approx(pearson(*draws), abs=1e-12)
    assert [c.verdict for c in split.checks] == ["unstable", "unstable"] and max(expected) < 0.7
    seeing = explain(gemma3, MultiImage(GEMMA_IMAGES), [target], method="GradCAM", layers="1", null=0)
    assert [c.verdict for c in seeing.split[0].checks] == ["ok", "ok"]
    projector, = layer_modules(gemma3, [PROJECTOR])
    handle = projector.register_forward_hook(lambda module, args, output: output * 0)
    try:
        blind = explain(gemma3, MultiImage(GEMMA_IMAGES), [target], method="GradCAM", layers="1", null=0)
    finally:
        handle.remove()
    assert blind.reliance[0].prompt_only
    assert all(c.prompt_only and c.verdict in ("blank", "untestable") for c in blind.split[0].checks)


def test_a_split_check_removes_only_its_images_pixels():
    """check_maps(region=...) on a model that sums its input: each removal takes exactly its share of the region's
    pixels (its top or bottom by the map), the peak's window is cut at the region's edge, nothing outside moves."""
    class Sum(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(x.clone())
            return torch.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1)

    model, x = Sum(), torch.ones(1, 3, 10, 20)
    cam = np.random.default_rng(0).random((10, 20)).astype(np.float32)
    cam[5, 12] = 3.0  # the map's peak, in the other image
    cam[5, 9] = 2.0  # the region's peak, on its right edge
    region = np.zeros((10, 20), bool)
    region[:, :10] = True
    [check] = check_maps(model, x, cam, ClassifierOutputTarget(0), fractions=(0.05, 0.2), batch_size=64,
                         peak_window=4, region=region)
    assert check.top_removed == [600 - 3 * 5, 600 - 3 * 20] and check.bottom_removed == check.top_removed
    assert check.peak_drop == 3 * 4 * 3  # rows 3-6, columns 7-9: the window's columns 10 lies outside the region
    images = torch.cat(model.seen)
    assert bool((images[:, :, ~torch.from_numpy(region)] == 1).all())
    removed = (images[1, 0] == 0).numpy()  # after the clean image, the top 5 %: the region's 5 largest values
    assert set(zip(*np.nonzero(removed))) == set(zip(*np.unravel_index(
        np.argsort(np.where(region, cam, -1), axis=None)[-5:], cam.shape)))


def test_several_images_bad_input_gets_one_clear_error(wrapper, tmp_path):
    with pytest.raises(ValueError, match=r"^Several images in one prompt: got none; pass two or more images\.$"):
        MultiImage([])
    with pytest.raises(ValueError, match=r"^Several images in one prompt: got one image; pass it alone "
                                         r"\(explain\(wrapper, image\), --image\) or add the others\.$"):
        MultiImage([random_image(28, 28)])
    # the processor's own limit (smart_resize: aspect ratio under 200), naming the image
    with pytest.raises(ValueError, match=r"^image 2 of 2: .*aspect ratio"):
        wrapper.preprocess([random_image(56, 56), random_image(4, 1000)])
    assert wrapper.image_boxes is None
    mistral3 = Mistral3Wrapper(*build_tiny_mistral3(tmp_path / "mistral3"), prompt=PROMPT)
    with pytest.raises(ValueError, match=r"^Mistral3Wrapper takes one image per prompt; several images in one prompt "
                                         r"work with Qwen2-VL, Qwen2\.5-VL, Qwen3-VL, Qwen3\.5, GLM-4V, InternVL, "
                                         r"Idefics3 / SmolVLM, LLaVA 1\.5, LLaVA-NeXT, LLaVA-OneVision and Gemma 3 "
                                         r"\(without pan-and-scan\)\.$"):
        explain(mistral3, MultiImage(GEMMA_IMAGES))


def test_a_split_warns_only_where_an_image_holds_much_of_the_mass_and_fails_its_check():
    inverted = MapCheck(-0.5, [1.0], [0.5], False, 0.0)
    chance = MapCheck(0.1, [1.0], [1.1], False, 0.0, null_margin=0.2)
    boxes = side_by_side([(2, 2), (2, 2), (2, 2)])
    split = ImageSplit(boxes, np.array([0.5, 0.3, 0.2]), [inverted, chance, chance], [], [])
    assert split.warnings(["a.png", "b.png", "c.png"]) == [
        "a.png (50% of the map's mass): its part of the map is inverted (deletion check -0.5: removing its most "
        "relevant pixels hurts the target less than removing its least relevant)."]
    passing = MapCheck(1.0, [0.0], [1.0], False, 0.0)  # the whole map passes: only the split warns
    result = Explanation(np.zeros((1, 2, 6)), ["GradCAM"], [1], [passing], ["GradCAM"], [1], np.zeros((1, 1, 1, 2, 6)),
                         [[[passing]]], [None], split=[split])
    assert result.warnings() == [split.warnings(["image 0, picture 1", "image 0, picture 2", "image 0, picture 3"])[0]]
    assert result.warnings()[0].startswith("image 0, picture 1 (50% of the map's mass): its part of the map is inv")


def test_the_occlusion_fallbacks_map_splits_between_the_images_as_any_map(gemma3):
    """RandomCAM's map of two images is unstable; with the fallback asked, explain keeps occlusion's map (token 3
    here), and its split is that map's: each part on its picture, each image's check confined to it, no stability
    (occlusion is deterministic)."""
    target = ClassifierOutputTarget(3)
    np.random.seed(5)
    result = explain(gemma3, MultiImage(GEMMA_IMAGES), [target], method="RandomCAM", layers="1", fallback=True)
    assert (result.methods[0], result.layers[0], result.checks[0].verdict) == ("Occlusion", "input", "ok")
    [split] = result.split
    x = gemma3.preprocess(list(GEMMA_IMAGES))
    for frame, part, m in zip(split.frames, image_maps(result.model_maps, split.boxes), split.maps):
        np.testing.assert_allclose(m, frame.to_image(part[0]), atol=1e-6)
    for check, region in zip(split.checks, box_masks(split.boxes)):
        [expected] = check_maps(gemma3, x, result.model_maps[0], target, null=NULL_MAPS, region=region,
                                clean=result.reliance[0].clean)
        assert check == expected and check.stability is None
