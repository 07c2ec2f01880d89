"""The core contract: QwenVLWrapper equals the processor path, its maps equal hand-made Grad-CAM, and every grad-cam
method and metric runs on it, leaving the model as it was."""
import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import (AblationCAM, EigenCAM, EigenGradCAM, FEM, FinerCAM, GradCAM,
                              GradCAMElementWise, GradCAMPlusPlus, HiResCAM, KPCA_CAM, LayerCAM, RandomCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.perturbation_confidence import RemoveMostRelevantFirst
from pytorch_grad_cam.metrics.road import (NoisyLinearImputer, ROADCombined, ROADLeastRelevantFirst,
                                           ROADLeastRelevantFirstAverage, ROADMostRelevantFirst,
                                           ROADMostRelevantFirstAverage)
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import (HALF_DTYPES, PROMPT, assert_fullgrad_refused, assert_projector_candidate,
                      assert_state_kept_through_gradcam, chat_inputs, hidden_and_grad, model_state,
                      partly_frozen_in_train_mode, random_image)
from pytorch_grad_cam_vlm import QwenVLWrapper, ShapleyCAM, patchify
from pytorch_grad_cam_vlm.models.state import HookableTuple, hookable_tuple_outputs


def image_positions(processor, input_ids):
    return (input_ids[0] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).nonzero().flatten()


def direct_gradcam(model, processor, image, layer, target=None):
    """Grad-CAM by hand on model(**processor(...)): hooks on the raw model, parameters as loaded, full graph."""
    inputs = chat_inputs(processor, image, device=model.device)
    hidden, grad, target = hidden_and_grad(model, inputs, layer, target)
    positions = image_positions(processor, inputs["input_ids"].cpu())
    activations, grads = hidden[0, positions], grad[0, positions]
    cam = torch.relu((activations * grads.mean(0)).sum(-1))
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    return cam.reshape(gh // 2, gw // 2).numpy(), target, inputs


def gradcam_pipeline(cam, x):
    """grad-cam's post-processing of one layer's map: scale to [0, 1] and resize, then scale the layer mean again."""
    return scale_cam_image(scale_cam_image(cam[None], (x.shape[3], x.shape[2])))


@pytest.mark.parametrize("size", [(60, 100), (112, 112), (130, 250)])
def test_logits_equal_processor_path(qwen, device, size):
    model, processor = qwen
    image = random_image(*size)
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    x = wrapper.preprocess(image)
    inputs = chat_inputs(processor, image, device=device)
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    assert x.shape == (1, 3, gh * 14, gw * 14)
    assert torch.equal(patchify(x, 14, 2, 2), inputs["pixel_values"].cpu())
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        logits = wrapper(x)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape and logits.device.type == device.type
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)


def test_smart_resize_changes_size(wrapper):
    # 130x250 is not a multiple of 28: the processor's smart_resize makes it 140x252.
    assert wrapper.preprocess(random_image(130, 250)).shape == (1, 3, 140, 252)


def test_gradcam_equals_direct_computation(qwen, qwen_wrapper):
    model, processor = qwen
    wrapper = qwen_wrapper
    image = random_image(112, 168, seed=3)
    layer = wrapper.decoder_layers[1]
    reference, target, inputs = direct_gradcam(model, processor, image, layer)
    x = wrapper.preprocess(image)
    with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform) as cam:
        maps = cam(input_tensor=x, targets=None)
        explicit = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    expected = gradcam_pipeline(reference, x)
    assert maps.shape == (1, 112, 168)
    np.testing.assert_allclose(maps, expected, atol=1e-4)
    np.testing.assert_allclose(explicit, expected, atol=1e-4)


def test_reshape_puts_token_k_at_row_k_div_w(wrapper):
    x = wrapper.preprocess(random_image(112, 280))  # 8x20 patches: a 4x10 grid of image tokens (not 5x8)
    wrapper(torch.cat([x, x]))
    positions = wrapper.layout.vision_positions
    assert len(positions) == 40
    hidden = torch.zeros(2, int(wrapper.layout.text_inputs["input_ids"].shape[1]), 64)
    hidden[:, positions, 0] = torch.arange(40, dtype=torch.float32)
    grid = wrapper.reshape_transform(hidden)
    assert grid.shape == (2, 64, 4, 10)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(10), indexing="ij")
    assert torch.equal(grid[1, 0], (rows * 10 + cols).float())
    # older transformers return (hidden,) tuples from decoder layers
    assert torch.equal(wrapper.reshape_transform((hidden,)), grid)


METHODS = [GradCAM, HiResCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, EigenCAM, EigenGradCAM, GradCAMElementWise,
           ScoreCAM, AblationCAM, KPCA_CAM, FEM, ShapleyCAM, FinerCAM, RandomCAM]


def make_cam(method, wrapper, layers):
    extra = {"ablation_layer": wrapper.ablation_layer()} if method is AblationCAM else {}
    return method(model=wrapper, target_layers=layers, reshape_transform=wrapper.reshape_transform, **extra)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_every_method_runs_unchanged(qwen, method):
    model, processor = qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    x = wrapper.preprocess(random_image(56, 84, seed=1))
    pair = torch.cat([x, torch.flip(x, dims=[3])])
    before = model_state(model)
    token = int(wrapper(x).argmax())
    with make_cam(method, wrapper, [wrapper.decoder_layers[-2]]) as cam:
        results = {
            "none_b2": cam(input_tensor=pair, targets=None),
            "token_b1": cam(input_tensor=x, targets=[ClassifierOutputTarget(token)]),
        }
        if method is not FinerCAM:  # FinerCAM's call has no aug_smooth
            results["softmax_aug_b1"] = cam(input_tensor=x, targets=[ClassifierOutputSoftmaxTarget(token)],
                                            aug_smooth=True)
        results["eigen_b1"] = cam(input_tensor=x, targets=None, eigen_smooth=True)
    peaks = []
    for name, maps in results.items():
        assert maps.shape == (len(maps), 56, 84) and maps.dtype == np.float32, name
        assert maps.min() >= 0 and maps.max() <= 1 + 1e-6, name
        if "aug" not in name:  # each map is blank or scaled to max 1 (aug_smooth averages several)
            peaks += maps.reshape(len(maps), -1).max(1).tolist()
    assert all(p == 0 or abs(p - 1) < 1e-5 for p in peaks) and max(peaks) == pytest.approx(1, abs=1e-5)
    assert model_state(model) == before


def test_fullgrad_raises_clear_error(wrapper):
    assert_fullgrad_refused(wrapper, wrapper.preprocess(random_image(56, 56)))


def test_the_projector_is_an_explain_candidate(wrapper):
    assert_projector_candidate(wrapper, wrapper.merger, wrapper.preprocess(random_image(56, 56)))


def test_default_ablation_layer_is_undone_with_clear_error(tiny_qwen, capsys):
    model, processor = tiny_qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    x = wrapper.preprocess(random_image(56, 56))
    modules = [id(m) for m in model.modules()]
    # grad-cam's default AblationLayer fails on (B, seq, C) with an IndexError that its __exit__ swallows,
    # leaving the ablation layer inside the model.
    with AblationCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
        cam(input_tensor=x, targets=None)
    assert "IndexError" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"ablation_layer=wrapper.ablation_layer\(\)"):
        wrapper(x)
    assert [id(m) for m in model.modules()] == modules


def test_ablation_cam_matches_manual_ablation(tiny_qwen):
    """AblationCAM's weight for channel c is the relative score drop when channel c is zeroed at image positions."""
    model, processor = tiny_qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    x = wrapper.preprocess(random_image(56, 56, seed=2))
    layer = wrapper.decoder_layers[1]
    with torch.no_grad():
        logits = wrapper(x)[0]
    token = int(logits.argmax())
    with AblationCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform,
                     ablation_layer=wrapper.ablation_layer(), batch_size=16) as cam:
        weights = cam.get_cam_weights(x, layer, [ClassifierOutputTarget(token)],
                                      _reshaped_activations(wrapper, layer, x), None)
    channel = 5

    def zero_channel(module, args, output):
        output = output.clone()
        output[:, wrapper.layout.vision_positions, channel] = 0
        return output

    handle = layer.register_forward_hook(zero_channel)
    with torch.no_grad():
        ablated = wrapper(x)[0, token]
    handle.remove()
    expected = (logits[token] - ablated) / logits[token]
    assert weights[0, channel] == pytest.approx(float(expected), abs=1e-4)


def _reshaped_activations(wrapper, layer, x):
    store = {}

    def keep(module, args, output):
        store["a"] = wrapper.reshape_transform(output)

    handle = layer.register_forward_hook(keep)
    with torch.no_grad():
        wrapper(x)
    handle.remove()
    return store["a"].numpy()


def test_metrics_run_through_the_wrapper(wrapper):
    x = wrapper.preprocess(random_image(56, 56, seed=4))
    pair = torch.cat([x, torch.flip(x, dims=[2])])
    with torch.no_grad():
        tokens = wrapper(pair).argmax(-1).tolist()
    targets = [ClassifierOutputTarget(t) for t in tokens]
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        maps = cam(input_tensor=pair, targets=targets)
    with torch.no_grad():
        clean = wrapper(pair)
        scores = np.float32([clean[i, t] for i, t in enumerate(tokens)])
        mult = wrapper(pair * torch.from_numpy(maps)[:, None])
    expected_mult = np.float32([mult[i, t] for i, t in enumerate(tokens)]) - scores
    np.testing.assert_allclose(CamMultImageConfidenceChange()(pair, maps, targets, wrapper), expected_mult, atol=1e-5)

    torch.manual_seed(0)
    morf = ROADMostRelevantFirst(percentile=50)(pair, maps, targets, wrapper)
    torch.manual_seed(0)
    imputed = torch.stack([RemoveMostRelevantFirst(50, NoisyLinearImputer())(pair[i], torch.from_numpy(maps[i]))
                           for i in range(2)])
    with torch.no_grad():
        after = wrapper(imputed)
    np.testing.assert_allclose(morf, np.float32([after[i, t] for i, t in enumerate(tokens)]) - scores, atol=1e-5)

    for metric in (ROADLeastRelevantFirst(20), ROADMostRelevantFirstAverage([20, 80]),
                   ROADLeastRelevantFirstAverage([20, 80]), ROADCombined([20, 80])):
        result = metric(pair, maps, targets, wrapper)
        assert result.shape == (2,) and np.isfinite(result).all()


HALF_TOLERANCE = {torch.bfloat16: 0.03, torch.float16: 0.005}


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_map_close_to_float32(qwen, device, dtype):
    model, processor = qwen
    tolerance = HALF_TOLERANCE[dtype]
    half = Qwen2_5_VLForConditionalGeneration.from_pretrained(model.name_or_path, dtype=dtype).to(device)
    image = random_image(112, 112, seed=5)
    maps = {}
    for name, m in (("float32", model), ("half", half)):
        wrapper = QwenVLWrapper(m, processor, prompt=PROMPT)
        x = wrapper.preprocess(image)
        target = [ClassifierOutputTarget(int(QwenVLWrapper(model, processor, PROMPT)(x).argmax()))]
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            maps[name] = cam(input_tensor=x, targets=target)
        assert wrapper(x).dtype == torch.float32
    assert np.abs(maps["half"] - maps["float32"]).max() < tolerance


def test_model_state_restored_after_call_and_after_exception(qwen):
    model, processor = qwen
    with partly_frozen_in_train_mode(model, model.model.visual):
        wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
        assert_state_kept_through_gradcam(model, wrapper, wrapper.preprocess(random_image(56, 56)),
                                          [wrapper.decoder_layers[0], wrapper.vision_blocks[1]])


def test_frozen_while_computing_and_graph_starts_at_target(qwen_wrapper):
    """While a map is computed no parameter takes part in autograd, and no graph is built below the target layer.
    Probes are forward pre-hooks: only forward hooks mark a layer as watched."""
    wrapper = qwen_wrapper
    x = wrapper.preprocess(random_image(56, 56))
    seen = {}
    params = [p.requires_grad for p in wrapper.model.parameters()]
    probes = {"below": wrapper.decoder_layers[1], "target": wrapper.decoder_layers[2].mlp,
              "vision": wrapper.merger}

    def probe(name):
        def record(module, args):
            seen[name] = (args[0].requires_grad, torch.is_grad_enabled())
            seen["frozen"] = [p.requires_grad for p in wrapper.model.parameters()]
        return record

    handles = [module.register_forward_pre_hook(probe(name)) for name, module in probes.items()]
    try:
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[2]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            cam(input_tensor=x, targets=None)
    finally:
        for handle in handles:
            handle.remove()
    assert seen["vision"] == (False, False) and seen["below"] == (False, False)
    assert seen["target"] == (True, True)
    assert not any(seen["frozen"]) and any(params)
    assert [p.requires_grad for p in wrapper.model.parameters()] == params
    assert all(p.grad is None for p in wrapper.model.parameters())


def test_last_decoder_layer_warns_and_names_a_working_layer(wrapper):
    x = wrapper.preprocess(random_image(56, 56))
    with pytest.warns(UserWarning, match=r"decoder_layers\[-2\] \(layer 2\)"):
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[-1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            cam(input_tensor=x, targets=None)


@pytest.mark.parametrize("shape,message", [((1, 1, 56, 56), r"\(B, 3, H, W\)"), ((3, 56, 56), r"\(B, 3, H, W\)"),
                                           ((1, 3, 50, 56), "multiples of 28")])
def test_bad_tensor_input(wrapper, shape, message):
    with pytest.raises(ValueError, match=message):
        wrapper(torch.zeros(shape))


def test_a_prepared_canvas_is_taken_as_it_is(wrapper, tiny_qwen):
    """A canvas of whole token cells outside the processor's min/max pixels (28x28, below 56*56) is not resized
    again: smart_resize is not idempotent, and preprocess has resized the photo once already. The logits are the
    processor's on that canvas with its resize turned off."""
    model, processor = tiny_qwen
    canvas = random_image(28, 28)
    x = torch.from_numpy(canvas).permute(2, 0, 1)[None] / 255.0
    x = (x - wrapper.image_mean) / wrapper.image_std
    inputs = processor(text=[wrapper.chat_text()], images=[canvas], return_tensors="pt", do_resize=False)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x)[0], model(**inputs).logits[0, -1], atol=1e-5, rtol=0)


def test_prompt_with_image_token_is_refused(tiny_qwen):
    with pytest.raises(ValueError, match="question alone"):
        QwenVLWrapper(*tiny_qwen, prompt="<|vision_start|><|image_pad|><|vision_end|>What?")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_preprocess_converts_modes_to_rgb(wrapper, tiny_qwen, tmp_path, mode):
    rgb = Image.fromarray(random_image(60, 90, seed=6))
    image = rgb.convert(mode)
    path = tmp_path / "image.png"
    image.save(path)
    expected = wrapper.preprocess(np.asarray(image.convert("RGB")))
    for given in (image, path, str(path)):
        torch.testing.assert_close(wrapper.preprocess(given), expected)


def test_preprocess_bad_input(wrapper, tmp_path):
    with pytest.raises(FileNotFoundError):
        wrapper.preprocess(tmp_path / "missing.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(ValueError, match="Cannot read"):
        wrapper.preprocess(tmp_path / "not_an_image.png")
    with pytest.raises(ValueError, match="uint8"):
        wrapper.preprocess(np.zeros((56, 56, 3), dtype=np.float32))


def test_to_rgb_inverts_normalisation(wrapper):
    image = random_image(56, 84, seed=7)
    rgb = wrapper.to_rgb(wrapper.preprocess(image))
    assert rgb.shape == (1, 56, 84, 3)
    np.testing.assert_allclose(rgb[0], image / 255.0, atol=1e-5)


def test_offloaded_dispatch_gives_the_same_map(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    device_map = {"model.visual": "disk", "model.language_model.embed_tokens": "cpu",
                  "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
                  "model.language_model.layers.2": "cpu", "model.language_model.layers.3": "disk",
                  "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = Qwen2_5_VLForConditionalGeneration.from_pretrained(model.name_or_path, device_map=device_map,
                                                                    offload_folder=str(tmp_path))
    assert next(dispatched.parameters()).device.type == "meta"
    image = random_image(84, 112, seed=8)
    maps = []
    for m in (model, dispatched):
        wrapper = QwenVLWrapper(m, processor, prompt=PROMPT)
        before = model_state(m)
        with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                     reshape_transform=wrapper.reshape_transform) as cam:
            maps.append(cam(input_tensor=wrapper.preprocess(image), targets=None))
        assert model_state(m) == before
    np.testing.assert_allclose(maps[1], maps[0], atol=1e-5)


def test_qwen2_vl_through_the_same_class(qwen2, device):
    model, processor = qwen2
    image = random_image(84, 140, seed=9)
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    x = wrapper.preprocess(image)
    with torch.no_grad():
        reference = model(**chat_inputs(processor, image, device=device)).logits[:, -1]
        torch.testing.assert_close(wrapper(x), reference, atol=1e-4, rtol=0)
    reference, target, _ = direct_gradcam(model, processor, image, wrapper.decoder_layers[1])
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    np.testing.assert_allclose(maps, gradcam_pipeline(reference, x), atol=1e-4)


def test_tuple_outputs_are_hookable_by_gradcam():
    """Older transformers return (hidden,) from decoder layers; grad-cam records gradients of those too."""

    class Layer(torch.nn.Module):
        def __init__(self, as_tuple):
            super().__init__()
            self.conv, self.as_tuple = torch.nn.Conv2d(3, 4, 3, padding=1), as_tuple

        def forward(self, x):
            y = self.conv(x)
            return (y,) if self.as_tuple else y

    class Net(torch.nn.Module):
        def __init__(self, as_tuple):
            super().__init__()
            torch.manual_seed(0)
            self.layer, self.head = Layer(as_tuple), torch.nn.Linear(4, 3)

        def forward(self, x):
            with hookable_tuple_outputs([self.layer]):
                out = self.layer(x)
            hidden = out[0] if isinstance(out, tuple) else out
            assert isinstance(out, HookableTuple) == self.layer.as_tuple
            return self.head(hidden.mean((2, 3)))

    x = torch.randn(1, 3, 8, 8)
    maps = []
    for as_tuple in (False, True):
        net = Net(as_tuple)
        with GradCAM(model=net, target_layers=[net.layer],
                     reshape_transform=lambda o: o[0] if isinstance(o, tuple) else o) as cam:
            maps.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(1)]))
    assert maps[0].max() == pytest.approx(1, abs=1e-6)
    np.testing.assert_allclose(maps[1], maps[0], atol=1e-6)


def test_hooked_module_outside_the_layers_gets_a_graph_from_the_input(wrapper):
    """A target outside the known layers (here the final norm) is reached by a graph from the input: its gradient is
    recorded, and since the norm acts per position, the image positions get none and the map is blank."""
    x = wrapper.preprocess(random_image(56, 56))
    norm = wrapper._text_model.norm
    with GradCAM(model=wrapper, target_layers=[norm], reshape_transform=wrapper.reshape_transform) as cam:
        maps = cam(input_tensor=x, targets=None)
        assert len(cam.activations_and_grads.gradients) == 1
    assert maps.shape == (1, 56, 56) and maps.max() == 0


def test_transformers_output_recorders_are_not_mistaken_for_targets(tiny_qwen, recwarn):
    """transformers 5 leaves output-recording hooks on every layer once a model runs with output_hidden_states:
    they neither trigger the last-layer warning nor move where the graph starts."""
    model, processor = tiny_qwen
    image = random_image(56, 56)
    with torch.no_grad():
        model(**chat_inputs(processor, image), output_hidden_states=True)
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    x = wrapper.preprocess(image)
    seen = {}

    def record(module, args):
        seen["below"] = args[0].requires_grad

    handle = wrapper.decoder_layers[0].register_forward_pre_hook(record)
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        cam(input_tensor=x, targets=None)
    handle.remove()
    assert seen["below"] is False
    assert not [w for w in recwarn if "last decoder layer" in str(w.message)]


def test_layers_found_on_the_transformers_4_module_paths():
    """transformers 4.5x keeps the decoder layers at model.model.layers and the vision encoder at model.visual;
    walking the model finds them there as it does on 5.x's model.model.language_model / model.model.visual."""
    from pytorch_grad_cam_vlm.models.base import find_module_list

    class Visual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
            self.merger = torch.nn.Linear(2, 2)

    class TextModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(4, 2)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(5)])

    old = torch.nn.Module()
    old.model, old.visual = TextModel(), Visual()
    assert find_module_list(old, "embed_tokens") == (old.model, old.model.layers)
    assert find_module_list(old, "merger") == (old.visual, old.visual.blocks)
    with pytest.raises(ValueError, match="Found no layer list beside a 'merger' module"):
        find_module_list(TextModel(), "merger")
