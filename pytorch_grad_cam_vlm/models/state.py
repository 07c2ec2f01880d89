"""Keeping a wrapped model as it was: eval mode and frozen parameters only while an explanation runs, the autograd
graph started at the shallowest hooked layer, and hook-friendly outputs for layers that return tuples."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch


@contextmanager
def explaining(model: torch.nn.Module, freeze_parameters: bool = True) -> Iterator[None]:
    """Run ``model`` in eval mode with every parameter frozen; restore modes and ``requires_grad`` flags after.

    Restoring right after the forward pass is enough: autograd records ``requires_grad`` when it builds the graph,
    so the backward pass that follows computes no weight gradient.
    """
    training = [m for m in model.modules() if m.training]
    # By name, not by object: accelerate's offloading swaps parameter objects in and out around each forward.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad] if freeze_parameters else []
    try:
        for module in training:
            module.training = False
        for name in trainable:
            model.get_parameter(name).requires_grad_(False)
        yield
    finally:
        for module in training:
            module.training = True
        for name in trainable:
            model.get_parameter(name).requires_grad_(True)


def watching_hooks(module: torch.nn.Module) -> list:
    """The forward hooks of ``module`` itself, less transformers' output recorders (transformers 5 installs those for
    good the first time a model runs with ``output_attentions`` or ``output_hidden_states``)."""
    return [hook for hook in module._forward_hooks.values()
            if getattr(hook, "__module__", None) != "transformers.utils.output_capturing"]


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether anything (grad-cam, a user) watches this module or one of its submodules with a forward hook."""
    return any(watching_hooks(m) for m in module.modules())


# A stage of a model's forward pass: a module, or a group of modules whose first one starts it (the others consume
# only what the first one computes, such as a vision block and the DeepStack merger that reads its output).
Stage = Union[torch.nn.Module, Tuple[torch.nn.Module, ...]]


def stage_modules(stage: Stage) -> Tuple[torch.nn.Module, ...]:
    """The modules of a stage, the one that starts it first."""
    return tuple(stage) if isinstance(stage, (tuple, list)) else (stage,)


def shallowest_hooked(stages: Sequence[Stage], model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module that starts the first of ``stages`` (listed in execution order) that holds a hooked module, or
    ``None`` when nothing is hooked or a hooked module lies outside every stage (then the whole graph is needed)."""
    inside = set()
    first = None
    for stage in stages:
        group = stage_modules(stage)
        members = {m for module in group for m in module.modules()}
        inside |= members
        if first is None and any(watching_hooks(m) for m in members):
            first = group[0]
    outside = any(watching_hooks(m) for m in model.modules() if m not in inside)
    return None if outside else first


@contextmanager
def graph_starts_at(stage: Optional[torch.nn.Module]) -> Iterator[None]:
    """Build no autograd graph before ``stage``: run without grad, and turn grad on at ``stage``'s input, which
    becomes a leaf that requires grad. Everything grad-cam hooks lies at or after ``stage``."""
    if stage is None or not torch.is_grad_enabled():
        yield
        return

    def start_graph(module, args, kwargs):
        torch.set_grad_enabled(True)  # undone when the surrounding no_grad block exits
        if args:
            return (args[0].detach().requires_grad_(True),) + tuple(args[1:]), kwargs
        name = "hidden_states" if "hidden_states" in kwargs else "inputs_embeds"  # Gemma 4's projector
        kwargs = dict(kwargs, **{name: kwargs[name].detach().requires_grad_(True)})
        return args, kwargs

    handle = stage.register_forward_pre_hook(start_graph, with_kwargs=True)
    try:
        with torch.no_grad():
            yield
    finally:
        handle.remove()


class HookableTuple(tuple):
    """A layer's tuple output that grad-cam can hook: older transformers return ``(hidden_states, ...)`` from a
    decoder layer, and grad-cam's gradient hook needs ``requires_grad``/``register_hook`` on the output itself."""

    @property
    def requires_grad(self) -> bool:
        return self[0].requires_grad

    def register_hook(self, hook):
        return self[0].register_hook(hook)


def _hookable_output(module, args, output):
    if isinstance(output, tuple) and not isinstance(output, HookableTuple) and isinstance(output[0], torch.Tensor):
        return HookableTuple(output)
    return None


@contextmanager
def hookable_tuple_outputs(layers: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Make tuple outputs of ``layers`` hookable for the duration of one forward pass. The hook is prepended so
    that it runs before grad-cam's own hooks."""
    handles: List = [layer.register_forward_hook(_hookable_output, prepend=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run a transformers model with eager attention (attention weights are computed, and second derivatives
    exist), then restore the implementation of the model and of each of its sub-models."""
    config = model.config
    previous = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        if getattr(config, key, None) is not None:
            previous[key] = getattr(config, key)._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
