"""CLIPWrapper on tiny CLIP, SigLIP and SigLIP 2 models built offline: logits equal to the model's own, patches on
the right grid cells, every grad-cam method giving the map it gives on the model's own forward pass."""
import warnings

import numpy as np
import pytest
import torch
from pytorch_grad_cam import (FEM, AblationCAM, EigenCAM, EigenGradCAM, FullGrad, GradCAM, GradCAMElementWise,
                              GradCAMPlusPlus, HiResCAM, KPCA_CAM, LayerCAM, RandomCAM, ScoreCAM, XGradCAM)
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst

from conftest import model_state, random_image
from pytorch_grad_cam_vlm.models.clip import DEFAULT_TEXT_KWARGS, CLIPWrapper
from pytorch_grad_cam_vlm.methods.shapley_cam import ShapleyCAM
from pytorch_grad_cam_vlm.methods.smooth_grad import SmoothEigenCAM, SmoothGradCAM
from pytorch_grad_cam_vlm.models.tiny.clip import build_tiny_clip

TEXTS = ["a dog", "a red circle on the left", "a photo of a cat"]
# A size the tiny CLIP/SigLIP were not trained at (32x32): position embeddings are interpolated to a 6x8 grid.
OTHER_SIZE = {"size": {"height": 48, "width": 64}, "do_center_crop": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, processor) per family, built on first use."""
    built = {}

    def get(family):
        if family not in built:
            built[family] = build_tiny_clip(tmp_path_factory.mktemp(f"tiny_{family}"), family=family, seed=0)
        return built[family]
    get.built = built  # conftest checks every built model for hooks left behind
    return get


class ProcessorPath(torch.nn.Module):
    """The reference: the model's own forward on the processor's text inputs, returning ``logits_per_image``."""

    def __init__(self, model, processor, family):
        super().__init__()
        self.model = model
        self.text_inputs = processor(text=TEXTS, return_tensors="pt", **DEFAULT_TEXT_KWARGS[family]).to(model.device)

    def forward(self, x):
        return self.model(**self.text_inputs, pixel_values=x, interpolate_pos_encoding=True).logits_per_image


def reference_reshape(prefix, h, w):
    return lambda t: t[:, prefix:].reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2"])
def test_logits_equal_the_models_own_for_two_sizes(tiny, family, device, to_device):
    model, processor = tiny(family)
    model = to_device(model, device)
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    for seed, (height, width) in enumerate([(40, 56), (64, 48)]):
        image = random_image(height, width, seed)
        with torch.no_grad():
            expected = model(**processor(text=TEXTS, images=image, return_tensors="pt",
                                         **DEFAULT_TEXT_KWARGS[family]).to(device)).logits_per_image
        logits = wrapper(wrapper.preprocess(image))
        assert logits.shape == (1, len(TEXTS))
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_logits_at_an_untrained_resolution_use_interpolated_positions(tiny, family):
    model, processor = tiny(family)
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    image = random_image(40, 56)
    images_kwargs = OTHER_SIZE if family == "clip" else {"size": OTHER_SIZE["size"]}
    x = wrapper.preprocess(image, **images_kwargs)
    assert x.shape == (1, 3, 48, 64)
    with torch.no_grad():
        expected = model(**processor(text=TEXTS, images=image, return_tensors="pt", **DEFAULT_TEXT_KWARGS[family],
                                     **images_kwargs), interpolate_pos_encoding=True).logits_per_image
    torch.testing.assert_close(wrapper(x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["clip", "siglip2"])
def test_reshape_puts_patch_k_at_row_k_div_w_and_column_k_mod_w(tiny, family):
    """Change the pixels of one patch: the embeddings change at that patch's token only, and the reshape puts the
    change at its row and column of the (non-square) grid."""
    model, processor = tiny(family)
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    patch = wrapper.patch_size
    x = wrapper.preprocess(random_image(48, 64), **(OTHER_SIZE if family == "clip" else {}))
    h, w = x.shape[2] // patch, x.shape[3] // patch
    assert h != w
    outputs = []
    handle = wrapper.vision_tower.embeddings.register_forward_hook(lambda m, i, o: outputs.append(o))
    row, column = h - 2, 1
    changed = x.clone()
    changed[:, :, row * patch:(row + 1) * patch, column * patch:(column + 1) * patch] += 1.0
    with torch.no_grad():
        wrapper(x)
        wrapper(changed)
    handle.remove()
    difference = (outputs[1] - outputs[0]).abs().sum(-1)
    k = row * w + column
    assert difference.nonzero()[:, 1].tolist() == [wrapper.prefix_tokens + k]
    grid = wrapper.reshape_transform(outputs[1] - outputs[0]).abs().sum(1)[0]
    assert grid.shape == (h, w) and grid.nonzero().tolist() == [[k // w, k % w]]
    # and every token: patch k carries the value k
    tokens = torch.arange(-wrapper.prefix_tokens, h * w, dtype=torch.float32).view(1, -1, 1).expand(2, -1, 5)
    expected = torch.arange(h * w, dtype=torch.float32).view(h, w)
    assert torch.equal(wrapper.reshape_transform((tokens,))[1, 4], expected)


def test_reshape_refuses_a_sequence_that_is_not_the_grid(tiny):
    model, processor = tiny("clip")
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    wrapper(wrapper.preprocess(random_image(32, 32)))
    with pytest.raises(ValueError, match=r"expected \(B, 17, C\)"):
        wrapper.reshape_transform(torch.zeros(1, 16, 8))


def _map(method, model, target_layers, reshape, x, targets, **kwargs):
    np.random.seed(0)  # RandomCAM
    with method(model=model, target_layers=target_layers, reshape_transform=reshape, **kwargs) as cam:
        return cam(input_tensor=x, targets=targets)


METHODS = [GradCAM, HiResCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, EigenCAM, EigenGradCAM, GradCAMElementWise,
           ScoreCAM, KPCA_CAM, FEM, RandomCAM, ShapleyCAM, AblationCAM, SmoothGradCAM, SmoothEigenCAM]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_every_method_gives_the_map_of_the_models_own_forward(tiny, method, device, to_device):
    """On a 6x8 grid, with targets by text and by index: the wrapper's map equals the method's map on the model's
    own forward pass, and the model is left as it was."""
    model, processor = tiny("clip")
    model = to_device(model, device)
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    x = wrapper.preprocess(random_image(40, 56), **OTHER_SIZE)
    layer = wrapper.vision_layers[-2]
    if method is HiResCAM:
        # Its per-token sum of gradient x activation over the residual stream nearly cancels (about 1e-7, the
        # logit is almost invariant to scaling it), so float rounding moves its map; the MLP branch does not cancel.
        layer = layer.mlp
    kwargs = {"ablation_layer": wrapper.ablation_layer()} if method is AblationCAM else {}
    if method in (SmoothGradCAM, SmoothEigenCAM):
        kwargs = {"n_samples": 3, "seed": 0}
    before = model_state(model)
    targets = [wrapper.target("a red circle on the left")]
    cam = _map(method, wrapper, [layer], wrapper.reshape_transform, x, targets, **kwargs)
    assert model_state(model) == before
    assert targets[0].category == 1
    reference = _map(method, ProcessorPath(model, processor, "clip"), [layer], reference_reshape(1, 6, 8), x,
                     [wrapper.target(1)], **kwargs)
    model.zero_grad(set_to_none=True)
    assert cam.shape == (1, 48, 64) and cam.std() > 0.05
    np.testing.assert_allclose(cam, reference, atol=1e-5)


def test_siglip_grad_cam_gives_the_map_of_the_models_own_forward(tiny):
    model, processor = tiny("siglip")
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    x = wrapper.preprocess(random_image(40, 56))
    layer = wrapper.vision_layers[-1]  # SigLIP's attention-pooling head reads every patch of the last layer
    cam = _map(GradCAM, wrapper, [layer], wrapper.reshape_transform, x, [wrapper.target(2)])
    reference = _map(GradCAM, ProcessorPath(model, processor, "siglip"), [layer], reference_reshape(0, 4, 4), x,
                     [wrapper.target(2)])
    model.zero_grad(set_to_none=True)
    assert cam.std() > 0.05
    np.testing.assert_allclose(cam, reference, atol=1e-5)


def test_siglip2_activations_and_gradients_equal_the_processors_padded_path(tiny):
    """SigLIP 2's processor pads the patches to 256 with a mask; the wrapper passes the real patches only. The
    layer's activations and the logit's gradient at the real patches are the same."""
    model, processor = tiny("siglip2")
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    image = random_image(40, 56)
    layer = wrapper.vision_layers[1]
    seen = []

    def keep(module, inputs, output):
        output.retain_grad()
        seen.append(output)
    handle = layer.register_forward_hook(keep)
    try:
        wrapper(wrapper.preprocess(image))[0, 1].backward()
        encoded = processor(text=TEXTS, images=image, return_tensors="pt")
        model(**encoded).logits_per_image[0, 1].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    h, w = (int(v) for v in encoded["spatial_shapes"][0])
    assert encoded["pixel_values"].shape[1] > h * w  # the processor did pad
    ours, theirs = seen
    torch.testing.assert_close(wrapper.reshape_transform(ours), reference_reshape(0, h, w)(theirs[:, :h * w]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(wrapper.reshape_transform(ours.grad),
                               reference_reshape(0, h, w)(theirs.grad[:, :h * w]), atol=1e-6, rtol=0)


def test_road_scores_the_models_own_logit_of_the_text(tiny):
    model, processor = tiny("clip")
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    x = wrapper.preprocess(random_image(32, 32))
    targets = [wrapper.target("a dog")]
    cam = _map(GradCAM, wrapper, wrapper.vision_layers[:1], wrapper.reshape_transform, x, targets)
    score, perturbed = ROADMostRelevantFirst(percentile=50)(x, cam, targets, wrapper, return_visualization=True)
    assert (perturbed != x).any()
    reference = ProcessorPath(model, processor, "clip")
    with torch.no_grad():
        expected = reference(perturbed)[0, 0] - reference(x)[0, 0]
    np.testing.assert_allclose(score, [expected.item()], atol=1e-5)


def test_ablation_layers_that_fail_on_tokens_are_taken_out_with_a_clear_error(tiny):
    model, processor = tiny("clip")
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    x = wrapper.preprocess(random_image(32, 32))
    layer = wrapper.vision_layers[-2]
    # grad-cam's default layer fails with an IndexError, which its `with` block swallows, leaving it in the model.
    with AblationCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform) as cam:
        cam(input_tensor=x, targets=[wrapper.target(0)])
    assert isinstance(wrapper.vision_layers[-2], AblationLayer)
    with pytest.raises(ValueError, match=r"ablation_layer=wrapper.ablation_layer\(\)"):
        wrapper(x)
    assert wrapper.vision_layers[-2] is layer
    # grad-cam's AblationLayerVit takes the hidden states alone, and transformers passes the attention mask too.
    with pytest.raises(ValueError, match="AblationLayerVit had replaced"):
        with AblationCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform,
                         ablation_layer=AblationLayerVit()) as cam:
            cam(input_tensor=x, targets=[wrapper.target(0)])
    assert wrapper.vision_layers[-2] is layer


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_warns_on_its_last_layer_where_gradient_maps_are_blank(tiny, family):
    model, processor = tiny(family)
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    x = wrapper.preprocess(random_image(32, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cam = _map(GradCAM, wrapper, wrapper.vision_layers[-1:], wrapper.reshape_transform, x, [wrapper.target(0)])
    clip = family == "clip"
    assert any(r"vision_layers[-2]" in str(w.message) for w in caught) == clip
    assert (cam.max() == 0) == clip  # CLIP pools its class token only


def test_no_graph_below_the_hooked_layer_and_no_weight_gradients(tiny):
    model, processor = tiny("clip")
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    x = wrapper.preprocess(random_image(32, 32))
    seen = []  # a pre-hook, which does not count as a hooked layer
    handle = wrapper.vision_layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    try:  # the graph starts at the input of layer 1: layer 0 builds none
        _map(GradCAM, wrapper, [wrapper.vision_layers[1]], wrapper.reshape_transform, x, [wrapper.target(0)])
        assert seen == [False]
    finally:
        handle.remove()
    # a target outside the layers (the embeddings' output, before the pre-layernorm) gets its graph from the input
    embeddings = _map(GradCAM, wrapper, [wrapper.vision_tower.embeddings], wrapper.reshape_transform, x,
                      [wrapper.target(0)])
    assert all(p.grad is None for p in model.parameters())
    reference = _map(GradCAM, ProcessorPath(model, processor, "clip"), [wrapper.vision_tower.embeddings],
                     reference_reshape(1, 4, 4), x, [wrapper.target(0)])
    model.zero_grad(set_to_none=True)
    np.testing.assert_allclose(embeddings, reference, atol=1e-5)


def test_text_embeddings_are_computed_once(tiny, monkeypatch):
    model, processor = tiny("clip")
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    calls = []
    monkeypatch.setattr(model, "get_text_features", lambda *a, **k: calls.append(1))
    x = wrapper.preprocess(random_image(32, 32))
    wrapper(x)
    wrapper(x)
    assert calls == []


def test_bad_input_gets_a_clear_error(tiny):
    model, processor = tiny("clip")
    with pytest.raises(ValueError, match="non-empty list"):
        CLIPWrapper(model, processor, texts="a dog")
    with pytest.raises(ValueError, match="distinct"):
        CLIPWrapper(model, processor, texts=["a dog", "a dog"])
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    with pytest.raises(ValueError, match="is not one of the wrapper's texts"):
        wrapper.target("a horse")
    with pytest.raises(ValueError, match="out of range for 3 texts"):
        wrapper.target(3)
    assert wrapper.target(-1).category == 2
    with pytest.raises(ValueError, match="multiples of 8 pixels"):
        wrapper(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        wrapper(torch.zeros(3, 32, 32))
    with pytest.raises(NotImplementedError, match="FullGrad is not supported"):
        FullGrad(model=wrapper, target_layers=[])(input_tensor=wrapper.preprocess(random_image(32, 32)),
                                                  targets=[wrapper.target(0)])
    qwen_like = torch.nn.Linear(2, 2)
    qwen_like.config = type("Config", (), {"model_type": "qwen2_5_vl"})()
    with pytest.raises(ValueError, match="supports model types clip, siglip, siglip2"):
        CLIPWrapper(qwen_like, processor, texts=TEXTS)


def test_preprocess_takes_paths_pil_images_and_arrays(tiny, tmp_path):
    from PIL import Image

    model, processor = tiny("clip")
    wrapper = CLIPWrapper(model, processor, texts=TEXTS)
    array = random_image(40, 56)
    Image.fromarray(array).save(tmp_path / "image.png")
    x = wrapper.preprocess(array)
    assert torch.equal(wrapper.preprocess(tmp_path / "image.png"), x)
    assert torch.equal(wrapper.preprocess(Image.fromarray(array).convert("RGBA")), x)
    expected = processor.image_processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(x, expected)
    rgb = wrapper.to_rgb(x)
    assert rgb.shape == (1, 32, 32, 3) and 0 <= rgb.min() and rgb.max() <= 1
