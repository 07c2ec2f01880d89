"""Shared fixtures: tiny models built from configs, saved and loaded back, once per test session."""
import numpy as np
import pytest

from pytorch_grad_cam_vlm import QwenVLWrapper, build_tiny_model
from pytorch_grad_cam_vlm.models.state import watching_hooks

PROMPT = "What color is the circle?"


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """(model, processor) of a tiny random Qwen2.5-VL with window attention (windows of 56 px, blocks 1 and 3 global)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """(model, processor) of a tiny random Qwen2-VL."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_vl"), family="qwen2_vl", seed=0)


@pytest.fixture
def wrapper(tiny_qwen):
    model, processor = tiny_qwen
    return QwenVLWrapper(model, processor, prompt=PROMPT)


def random_image(height, width, seed=0):
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


def chat_inputs(processor, image, prompt=PROMPT):
    """The reference path: the processor on the chat-formatted prompt and the raw image."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt")


def hidden_and_grad(model, inputs, layer, target=None):
    """By hand on the raw model (parameters as loaded, full graph): ``layer``'s output and its gradient for the
    last position's logit of ``target`` (default: the argmax), and the target."""
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
    return store["hidden"].detach(), store["hidden"].grad, target


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
    """Every test leaves the session's tiny models without hooks (grad-cam's included)."""
    yield
    for name in ("tiny_qwen", "tiny_qwen2"):
        if name in request.fixturenames:
            model = request.getfixturevalue(name)[0]
            assert _hook_count(model) == 0, f"{request.node.name} left hooks on the {name} model"
