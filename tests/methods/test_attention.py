"""AttentionMap and AttentionRollout: the attention weights the model itself reports, on the right grid cells,
scored by ROAD like any grad-cam method, with the model's attention implementation restored."""
import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import chat_inputs, model_state, random_image
from pytorch_grad_cam_vlm.methods.attention import AttentionMap, AttentionRollout, discard_lowest
from pytorch_grad_cam_vlm.models.clip import CLIPWrapper
from pytorch_grad_cam_vlm.models.tiny.clip import build_tiny_clip

HEIGHT, WIDTH = 112, 84  # 8x6 patches of 14 pixels, a 4x3 grid of image tokens


def report(model, processor):
    """The image, its image-token positions, and the model's own attentions (on the CPU) from the processor's
    inputs."""
    image = random_image(HEIGHT, WIDTH)
    inputs = chat_inputs(processor, image, device=model.device)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    positions = (inputs["input_ids"][0].cpu() == image_token).nonzero().flatten()
    with eager(model), torch.no_grad():
        attentions = tuple(a.cpu() for a in model(**inputs, output_attentions=True).attentions)
    assert len(attentions) == model.config.text_config.num_hidden_layers
    return image, positions, attentions


@pytest.fixture(scope="module")
def reported(tiny_qwen):
    return report(*tiny_qwen)


@pytest.fixture
def reported_on(reported, qwen, device):
    """``reported``, by the model on ``device``."""
    return reported if device.type == "cpu" else report(*qwen)


def eager(model):
    from pytorch_grad_cam_vlm.models.state import eager_attention
    return eager_attention(model)


def by_hand(weights, head_fusion):
    """Fuse heads of (B, heads, ...) weights the way the issue describes them."""
    if head_fusion == "mean":
        return weights.mean(1)
    if head_fusion == "max":
        return weights.max(1).values
    return weights[:, head_fusion]


def as_cam(grid):
    """What grad-cam's pipeline makes of a (B, h, w) map at one layer: scaled to the image, then aggregated."""
    return scale_cam_image(scale_cam_image(grid, (WIDTH, HEIGHT)))


@pytest.mark.parametrize("head_fusion", ["mean", "max", 1])
@pytest.mark.parametrize("layer", [0, 2])
def test_attention_map_is_the_last_tokens_attention_to_the_image_tokens(qwen_wrapper, reported_on, head_fusion,
                                                                       layer):
    wrapper = qwen_wrapper
    image, positions, attentions = reported_on
    model = wrapper.model
    before = model_state(model)
    implementation = model.config._attn_implementation
    with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[layer]], head_fusion=head_fusion) as cam:
        maps = cam(input_tensor=wrapper.preprocess(image), targets=None)
        raw = cam.activations_and_grads.activations[0][:, 0]
    expected = by_hand(attentions[layer][:, :, -1], head_fusion)[:, positions].reshape(1, 4, 3)
    torch.testing.assert_close(raw, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(maps, as_cam(expected.numpy()), atol=1e-6)
    assert model.config._attn_implementation == implementation != "eager"
    assert model_state(model) == before


@pytest.mark.parametrize("head_fusion, discard_ratio", [("mean", 0.0), ("max", 0.5)])
def test_rollout_multiplies_the_reported_attentions(qwen_wrapper, reported_on, head_fusion, discard_ratio):
    wrapper = qwen_wrapper
    image, positions, attentions = reported_on
    with AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers, head_fusion=head_fusion,
                          discard_ratio=discard_ratio) as cam:
        maps = cam(input_tensor=wrapper.preprocess(image), targets=None)
    rollout = torch.eye(attentions[0].shape[-1], dtype=torch.float64)
    for weights in attentions:  # Abnar & Zuidema: 0.5 A + 0.5 I, rows renormalised, multiplied from the first layer
        fused = by_hand(weights.double(), head_fusion)[0]
        for row in fused:  # the lowest half of each row's attended weights set to zero
            attended = row[row > 0].sort().values
            cut = int(len(attended) * discard_ratio)
            if cut:
                row[(row > 0) & (row <= attended[cut - 1])] = 0
        mixed = fused + torch.eye(len(fused), dtype=torch.float64)
        rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    expected = rollout[-1, positions].reshape(1, 4, 3).float().numpy()
    np.testing.assert_allclose(maps, as_cam(expected), atol=1e-6)


def test_discard_lowest_ignores_masked_keys():
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.3, 0.0, 0.0]])
    expected = torch.tensor([[0.0, 0.0, 0.3, 0.4], [0.7, 0.0, 0.0, 0.0]])
    assert torch.equal(discard_lowest(attention, 0.5), expected)


def test_road_scores_attention_maps_like_any_method(wrapper, reported):
    image = reported[0]
    x = wrapper.preprocess(image)
    with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[1]]) as cam:
        maps = cam(input_tensor=x, targets=None)
        token = int(cam.outputs.argmax())
    targets = [ClassifierOutputTarget(token)]
    score, perturbed = ROADMostRelevantFirst(percentile=50)(x, maps, targets, wrapper, return_visualization=True)
    with torch.no_grad():
        expected = wrapper(perturbed)[0, token] - wrapper(x)[0, token]
    np.testing.assert_allclose(score, [expected.item()], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), family="clip", seed=0)


def test_clip_attention_map_is_the_class_tokens_attention_to_the_patches(tiny_clip):
    model, processor = tiny_clip
    wrapper = CLIPWrapper(model, processor, texts=["a dog", "a cat"])
    image = random_image(40, 56)
    with eager(model), torch.no_grad():
        attentions = model(**processor(text=wrapper.texts, images=image, return_tensors="pt", padding=True),
                           output_attentions=True).vision_model_output.attentions
    with AttentionMap(model=wrapper, target_layers=[wrapper.vision_layers[1]], head_fusion="max") as cam:
        cam(input_tensor=wrapper.preprocess(image), targets=None)
        raw = cam.activations_and_grads.activations[0][:, 0]
    torch.testing.assert_close(raw, attentions[1][:, :, 0, 1:].max(1).values.reshape(1, 4, 4), atol=1e-6, rtol=0)
    assert model.config._attn_implementation != "eager"


def test_bad_arguments_get_a_clear_error(wrapper, reported, tmp_path):
    x = wrapper.preprocess(reported[0])
    with pytest.raises(ValueError, match="'mean', 'max' or a head index"):
        AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[0]], head_fusion="min")
    with pytest.raises(ValueError, match="Head 7 does not exist: the layer has 4 heads"):
        with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[0]], head_fusion=7) as cam:
            cam(input_tensor=x, targets=None)
    with pytest.raises(ValueError, match="has no self_attn module"):
        AttentionMap(model=wrapper, target_layers=[wrapper.vision_blocks[0]])
    with pytest.raises(ValueError, match=r"discard_ratio must lie in \[0, 1\)"):
        AttentionRollout(model=wrapper, target_layers=wrapper.decoder_layers, discard_ratio=1.0)
    siglip, processor = build_tiny_clip(tmp_path / "siglip", family="siglip")
    siglip_wrapper = CLIPWrapper(siglip, processor, texts=["a dog"])
    with pytest.raises(ValueError, match="siglip has no class token"):
        AttentionMap(model=siglip_wrapper, target_layers=[siglip_wrapper.vision_layers[0]])
    with pytest.raises(TypeError, match=r"need a wrapper that says where its query token.*token_geometry\(\)"):
        AttentionMap(model=siglip, target_layers=[siglip_wrapper.vision_layers[0]])


def test_attention_map_on_two_images_puts_each_images_attention_on_its_box(qwen_wrapper):
    """Several images in one prompt: the last token's attention to each image's tokens (reported by the model on the
    processor's inputs with both images) lies on that image's box of the canvas, nothing outside the boxes."""
    wrapper, cell = qwen_wrapper, qwen_wrapper.token_cell
    images = [random_image(2 * cell, 3 * cell, seed=1), random_image(3 * cell, 2 * cell, seed=2)]
    processor, model = wrapper.processor, wrapper.model
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": wrapper.prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt").to(model.device)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    positions = (inputs["input_ids"][0].cpu() == image_token).nonzero().flatten()
    with eager(model), torch.no_grad():
        weights = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0).cpu()[positions]
    x = wrapper.preprocess(images)
    with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[1]]) as cam:
        maps = cam(input_tensor=x, targets=None)
        raw = cam.activations_and_grads.activations[0][0, 0]
    expected, start = torch.zeros(x.shape[2] // cell, x.shape[3] // cell), 0
    for top, left, height, width in wrapper.image_boxes.boxes:
        h, w = height // cell, width // cell
        expected[top // cell:top // cell + h, left // cell:left // cell + w] = weights[start:start + h * w].view(h, w)
        start += h * w
    assert start == len(weights)
    torch.testing.assert_close(raw, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(maps, scale_cam_image(scale_cam_image(expected[None].numpy(), (x.shape[3], x.shape[2]))),
                               atol=1e-6)
