"""Shared fixtures: tiny models built from configs, saved and loaded back, once per test session; and the devices
that tests computing maps run on (the CPU always, CUDA when there is one)."""
import contextlib
import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import (FEM, KPCA_CAM, AblationCAM, EigenCAM, EigenGradCAM, FinerCAM, FullGrad, GradCAM,
                             GradCAMElementWise, GradCAMPlusPlus, HiResCAM, LayerCAM, RandomCAM, ScoreCAM, XGradCAM)

from pytorch_grad_cam_vlm import QwenVLWrapper, ShapleyCAM, build_tiny_model
from pytorch_grad_cam_vlm.models.state import watching_hooks

PROMPT = "What color is the circle?"

# Tests that compute maps take the `device` fixture and run once per device. The CUDA runs carry the `cuda` marker
# (`python -m pytest -m cuda` runs them alone) and are skipped, before any fixture is built, where CUDA is missing.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA is not available")])]
# README's method table for the vision-language families: the grad-cam methods their adapter tests run on a decoder
# layer and a vision block.
VLM_METHODS = [GradCAM, HiResCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, GradCAMElementWise, EigenGradCAM, EigenCAM,
               KPCA_CAM, FEM, RandomCAM, ScoreCAM, AblationCAM, FinerCAM, ShapleyCAM]
# The half-precision dtypes, for tests parametrised over them.
HALF_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test computes its maps on: ``cpu``, and ``cuda`` when CUDA is available. On CUDA, float32
    convolutions run in full precision for the test (cuDNN's default is TF32, 10-bit mantissas), so that maps
    compare with float32 references as they do on the CPU."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    owner, name, full = ((conv, "fp32_precision", "ieee") if hasattr(conv, "fp32_precision")  # torch >= 2.9
                         else (torch.backends.cudnn, "allow_tf32", False))
    previous = getattr(owner, name)
    setattr(owner, name, full)
    try:
        yield torch.device(request.param)
    finally:
        setattr(owner, name, previous)


@pytest.fixture(scope="session")
def to_device():
    """``to_device(module, device)``: the module itself on the CPU, else a copy of it on ``device``, made once per
    session (the session's models stay on the CPU, where the other tests use them)."""
    copies = {}

    def move(module, device):
        device = torch.device(device)
        if device.type == "cpu":
            return module
        key = (id(module), str(device))
        if key not in copies:  # the original is kept too, so that its id is not reused
            copies[key] = (module, copy.deepcopy(module).to(device))
        return copies[key][1]
    return move


@pytest.fixture
def qwen(tiny_qwen, device, to_device, request):
    """``tiny_qwen``'s (model, processor) on ``device``."""
    model, processor = tiny_qwen
    yield to_device(model, device), processor
    assert_no_hooks_left(to_device(model, device), request.node.name)


@pytest.fixture
def qwen2(tiny_qwen2, device, to_device, request):
    """``tiny_qwen2``'s (model, processor) on ``device``."""
    model, processor = tiny_qwen2
    yield to_device(model, device), processor
    assert_no_hooks_left(to_device(model, device), request.node.name)


@pytest.fixture
def qwen_wrapper(qwen):
    """The wrapper of ``qwen``: the tiny Qwen2.5-VL on ``device``."""
    return QwenVLWrapper(*qwen, prompt=PROMPT)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """(model, processor) of a tiny random Qwen2.5-VL with window attention (windows of 56 px, blocks 1 and 3 global)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A folder holding ``tiny_qwen``'s model and processor (the same seed), for the command line to load; tests only
    read it."""
    path = tmp_path_factory.mktemp("tiny_qwen_dir")
    build_tiny_model(path, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """(model, processor) of a tiny random Qwen2-VL."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_vl"), family="qwen2_vl", seed=0)


@pytest.fixture
def wrapper(tiny_qwen):
    model, processor = tiny_qwen
    return QwenVLWrapper(model, processor, prompt=PROMPT)


def assert_same_map(actual, expected, device):
    """Two computations of one map: bit for bit on the CPU; on CUDA, whose kernels may sum in another order from
    call to call (atomics in backward passes), to within float32 rounding."""
    if device.type == "cpu":
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, atol=1e-6)


def random_image(height, width, seed=0):
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


def chat_inputs(processor, image, prompt=PROMPT, device="cpu"):
    """The reference path: the processor on the chat-formatted prompt and the raw image (tensors on ``device``)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt").to(device)


def hidden_and_grad(model, inputs, layer, target=None):
    """By hand on the raw model (parameters as loaded, full graph): ``layer``'s output and its gradient for the
    last position's logit of ``target`` (default: the argmax), and the target; both on the CPU."""
    store = {}

    def keep(module, args, output):
        output.retain_grad()
        store["hidden"] = output

    handle = layer.register_forward_hook(keep)
    logits = model(**inputs).logits[0, -1]
    handle.remove()
    target = int(logits.argmax()) if target is None else target
    logits[target].backward()
    model.zero_grad(set_to_none=True)
    return store["hidden"].detach().cpu(), store["hidden"].grad.cpu(), target


def model_state(model):
    """What a call must leave as it was: hooks, requires_grad flags, modes and gradients."""
    return dict(
        hooks=_hook_count(model),
        requires_grad=[p.requires_grad for p in model.parameters()],
        training=[m.training for m in model.modules()],
        grads=sum(p.grad is not None for p in model.parameters()),
        modules=[id(m) for m in model.modules()],
    )


def _hook_count(model):
    """Hooks on the model, less transformers' own output recorders (see model_state.watching_hooks)."""
    return sum(len(watching_hooks(m)) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture(autouse=True)
def no_hooks_left_on_shared_models(request):
    """Every test leaves the session's tiny models, and a family module's ``tiny`` model, without hooks (grad-cam's
    included); ``qwen`` and ``qwen2`` check their copies on other devices."""
    yield
    for name in ("tiny_qwen", "tiny_qwen2"):
        if name in request.fixturenames:
            assert_no_hooks_left(request.getfixturevalue(name)[0], request.node.name, name)
    if "tiny" in request.fixturenames:
        # a family test module's tiny model: (model, processor, ...), (name, model, ...), or a builder per family
        # whose ``built`` dict holds those tuples
        tiny = request.getfixturevalue("tiny")
        for built in getattr(tiny, "built", {}).values() if callable(tiny) else [tiny]:
            model = next(item for item in built if isinstance(item, torch.nn.Module))
            assert model_state(model)["hooks"] == 0, f"{request.node.name} left hooks on the model"


def perturb_cell(x, top, left, row, col, cell, by=0.5):
    """A copy of inputs ``x`` with token cell ``(row, col)`` (of ``cell`` pixels) of the box at ``(top, left)``
    raised by ``by``."""
    perturbed = x.clone()
    perturbed[:, :, top + row * cell:top + (row + 1) * cell, left + col * cell:left + (col + 1) * cell] += by
    return perturbed


def first_block_inputs(wrapper, *inputs):
    """The first vision block's input (patch embeddings, in the encoder's order) of a forward pass of each of
    ``inputs``."""
    seen = []
    handle = wrapper.vision_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for x in inputs:
                wrapper(x)
    finally:
        handle.remove()
    return seen


def changed_cells(wrapper, before, after):
    """``(h, w)`` bool: where two hidden states differ on the grid ``reshape_transform`` places them on."""
    return (wrapper.reshape_transform(after) - wrapper.reshape_transform(before)).abs().amax(1)[0] > 1e-6


def projector_and_decoder_input(wrapper, x):
    """The projector's output and the first decoder layer's input of a forward pass of ``x``, each placed by
    ``reshape_transform``: the projector's rows (Qwen's merger: in window order for Qwen2.5-VL) are the decoder's
    input at the image positions."""
    kept = {}

    def keep_embeds(module, args, kwargs):
        kept["embeds"] = args[0] if args else kwargs["hidden_states"]

    handles = [wrapper.projector.register_forward_hook(lambda module, args, out: kept.update(projector=out)),
               wrapper.decoder_layers[0].register_forward_pre_hook(keep_embeds, with_kwargs=True)]
    try:
        with torch.no_grad():
            wrapper(x)
    finally:
        for handle in handles:
            handle.remove()
    projector = kept["projector"][0] if isinstance(kept["projector"], tuple) else kept["projector"]
    projector = getattr(projector, "pooler_output", projector)
    return wrapper.reshape_transform(projector), wrapper.reshape_transform(kept["embeds"])


def assert_no_hooks_left(model, test, name="device's"):
    assert _hook_count(model) == 0, f"{test} left hooks on the {name} model"


@contextlib.contextmanager
def partly_frozen_in_train_mode(model, frozen):
    """``model`` in train mode with ``frozen`` (a submodule) without gradients, as a fine-tuning user may hand it
    over; eval mode and every flag back afterwards."""
    frozen.requires_grad_(False)
    model.train()
    try:
        yield
    finally:
        frozen.requires_grad_(True)
        model.eval()


def assert_state_kept_through_gradcam(model, wrapper, x, layers):
    """GradCAM at ``layers`` runs with the model in its own (train) mode and leaves its hooks, flags, modes and
    gradients as they were, after a call and after an exception inside the ``with`` block. Returns that state."""
    before = model_state(model)
    with GradCAM(model=wrapper, target_layers=layers, reshape_transform=wrapper.reshape_transform) as cam:
        cam(input_tensor=x, targets=None)
        assert model.training  # grad-cam's .eval() reaches the wrapper only; forward restores the model's mode
    assert model_state(model) == before
    with pytest.raises(RuntimeError, match="inside the block"):
        with GradCAM(model=wrapper, target_layers=layers, reshape_transform=wrapper.reshape_transform) as cam:
            cam(input_tensor=x, targets=None)
            raise RuntimeError("inside the block")
    assert model_state(model) == before
    return before


def check_method_on_decoder_and_vision(method, model, wrapper, x, decoder_layer, ablation_refusal):
    """README's method table on one family: ``method`` on ``decoder_layer`` at batch 2 (``x`` and its mirror) and on
    vision block 1 at batch 1, AblationCAM refused on the vision block with ``ablation_refusal``. Each map has the
    input's size, is float32 in [0, 1], blank or scaled to max 1, and not constant; the model is left as it was."""
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    pair = torch.cat([x, torch.flip(x, dims=[3])])
    before = model_state(model)
    extra = {"ablation_layer": wrapper.ablation_layer()} if method is AblationCAM else {}
    results = {}
    with method(model=wrapper, target_layers=[decoder_layer], reshape_transform=wrapper.reshape_transform,
                **extra) as cam:
        results["decoder_b2"] = cam(input_tensor=pair, targets=None)
    with method(model=wrapper, target_layers=[wrapper.vision_blocks[1]], reshape_transform=wrapper.reshape_transform,
                **extra) as cam:
        if method is AblationCAM:
            with pytest.raises(ValueError, match=ablation_refusal):
                cam(input_tensor=x, targets=[ClassifierOutputTarget(5)])
        else:
            results["vision_b1"] = cam(input_tensor=x, targets=[ClassifierOutputTarget(5)])
    for name, maps in results.items():
        assert maps.shape == (len(maps),) + tuple(x.shape[2:]) and maps.dtype == np.float32, name
        assert maps.min() >= 0 and maps.max() <= 1 + 1e-6, name
        peaks = maps.reshape(len(maps), -1).max(1)  # each map is blank or scaled to max 1
        assert all(p == 0 or abs(p - 1) < 1e-5 for p in peaks) and peaks.max() == pytest.approx(1, abs=1e-5), name
        assert all(np.ptp(m) > 0 for m in maps if m.max() > 0), name  # not one value over the whole map
    assert model_state(model) == before


def assert_fullgrad_refused(wrapper, x):
    """grad-cam's FullGrad, which needs every layer's bias gradients, is refused with the package's error."""
    with pytest.raises(NotImplementedError, match="FullGrad is not supported"):
        with FullGrad(model=wrapper, target_layers=[], reshape_transform=wrapper.reshape_transform) as cam:
            cam(input_tensor=x, targets=None)


def assert_projector_candidate(wrapper, module, x):
    """``explain``'s projector candidate is ``module``, between the vision encoder and the decoder: its map there
    equals grad-cam's GradCAM on that module, and ``layers="auto"`` tries it first."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pytorch_grad_cam_vlm import explain
    from pytorch_grad_cam_vlm.layers import layer_modules

    assert layer_modules(wrapper, ["projector"]) == [module]
    targets = [ClassifierOutputTarget(2)]
    result = explain(wrapper, x, targets, method="GradCAM", layers="projector,1")
    with GradCAM(model=wrapper, target_layers=[module], reshape_transform=wrapper.reshape_transform) as cam:
        expected = cam(input_tensor=x, targets=targets)
    assert result.candidate_layers == ["projector", 1]
    np.testing.assert_allclose(result.candidate_maps[:, 0, 0], expected, atol=1e-5)
    assert explain(wrapper, x, targets, method="GradCAM").candidate_layers[0] == "projector"


def check_cli_explain(folder, family, wrapper_cls, image, tmp_path, capsys):
    """``explain`` on a tiny checkpoint folder: the family is detected from its config, GradCAM at decoder layer 1
    writes a map equal to a direct call, and the plain command (every choice left to its default) writes its files.
    Returns the preprocessed image."""
    import json
    import os

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pytorch_grad_cam_vlm.cli import main
    from pytorch_grad_cam_vlm.image import load_rgb
    from pytorch_grad_cam_vlm.models.registry import layer_count, load_model, make_subject, model_config

    config, detected = model_config(folder)
    assert detected == family and layer_count(config, family) == 4
    model, processor = load_model(folder, family, torch.float32, torch.device("cpu"))
    subject = make_subject(family, model, processor, PROMPT, None)
    assert type(subject.wrapper) is wrapper_cls and subject.layers == subject.wrapper.decoder_layers
    out = tmp_path / "out"
    code = main(["explain", "--model", folder, "--image", str(image), "--prompt", PROMPT, "--method", "GradCAM",
                 "--layers", "1", "--mode", "single", "--out", str(out), "--device", "cpu", "--dtype", "float32"])
    assert code == 0, capsys.readouterr()
    [row] = json.loads((out / "report.json").read_text())
    assert (out / "report.csv").is_file() and row["layers"] == [1] and row["method"] == "GradCAM"
    assert all((out / name).is_file() for name in row["files"])
    [saved] = [np.load(out / name) for name in row["files"] if name.endswith(".npy")]
    wrapper = subject.wrapper
    x = wrapper.preprocess(str(image))
    with torch.no_grad():
        token = int(wrapper(x).argmax())
    assert row["predicted_token"] == processor.tokenizer.decode([token])
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        expected = cam(input_tensor=x, targets=[ClassifierOutputTarget(token)])
    # Saved on the user's image: its height and width, the model-frame map carried by the family's frame.
    height, width = np.asarray(load_rgb(str(image))).shape[:2]
    assert saved.shape == (1, height, width)
    carried = wrapper.image_frame((height, width), tuple(x.shape[2:])).to_image(expected)
    np.testing.assert_allclose(saved, carried, atol=1e-5)
    assert sorted(os.listdir(out)) == sorted(["report.json", "report.csv"] + row["files"])
    plain = tmp_path / "plain"
    assert main(["explain", "--model", folder, "--image", str(image), "--prompt", PROMPT, "--out", str(plain)]) == 0
    [row] = json.loads((plain / "report.json").read_text())
    assert row["files"] and all((plain / name).is_file() for name in row["files"])
    assert sorted(os.listdir(plain)) == sorted(["report.json", "report.csv"] + row["files"])
    return x


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: results are bit-identical for one thread count, and accelerate's CPU processes
    run one thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def answer_survives_a_blank_image(reliance) -> bool:
    """The target moves by less than the warning's threshold when the whole image is replaced or blurred: a default
    answer (the demo model's "triangle"), which the check's removals mostly leave as it is, so that "chance" is often
    the honest verdict there; the pinned rates of the trained models were measured with these samples left out."""
    from pytorch_grad_cam_vlm.metrics.reliance import RELIANCE_THRESHOLD

    return max(abs(reliance.share), abs(reliance.blur_share)) < RELIANCE_THRESHOLD
