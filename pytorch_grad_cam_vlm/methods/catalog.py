"""The explanation methods by name: every grad-cam method, this package's ShapleyCAM and Smooth twins, and the
keywords each needs on a wrapper."""
from __future__ import annotations

from typing import Dict

import torch

from pytorch_grad_cam_vlm.errors import InputError


UNSUPPORTED_METHODS = {
    "FullGrad": "it sums bias gradients of Conv2d/BatchNorm2d layers, which transformers do not have",
    "SmoothFullGrad": "it sums bias gradients of Conv2d/BatchNorm2d layers, which transformers do not have",
}


def method_classes() -> Dict[str, type]:
    """Every grad-cam method by class name (``BaseCAM`` subclasses; ShapleyCAM in this package's token-aware
    version) and their Smooth twins, less the ones that cannot run on transformers."""
    import pytorch_grad_cam
    from pytorch_grad_cam.base_cam import BaseCAM

    from pytorch_grad_cam_vlm.methods import smooth_grad
    from pytorch_grad_cam_vlm.methods.shapley_cam import ShapleyCAM

    classes = {name: cls for name, cls in vars(pytorch_grad_cam).items()
               if isinstance(cls, type) and issubclass(cls, BaseCAM)}
    classes["ShapleyCAM"] = ShapleyCAM
    classes.update({name: cls for name, cls in vars(smooth_grad).items() if isinstance(cls, type)
                    and issubclass(cls, smooth_grad.SmoothGrad) and cls is not smooth_grad.SmoothGrad})
    return {name: cls for name, cls in sorted(classes.items()) if name not in UNSUPPORTED_METHODS}


def resolve_method(name: str) -> type:
    """The method class called ``name`` (case-insensitive)."""
    if name in UNSUPPORTED_METHODS:
        raise InputError(f"Method {name} is not supported on vision-language models: {UNSUPPORTED_METHODS[name]}.")
    classes = method_classes()
    by_lower = {known.lower(): cls for known, cls in classes.items()}
    if name.lower() not in by_lower:
        raise InputError(f"Unknown method {name!r}: use one of {', '.join(classes)}.")
    return by_lower[name.lower()]


def is_smooth(method_cls: type) -> bool:
    """Whether ``method_cls`` is a Smooth twin (it takes ``n_samples``, ``noise_level``, ...)."""
    from pytorch_grad_cam_vlm.methods.smooth_grad import SmoothGrad

    return issubclass(method_cls, SmoothGrad)


def draws_at_random(method_cls: type) -> bool:
    """Whether two runs of ``method_cls`` give different maps: grad-cam's RandomCAM (random channel weights) and the
    Smooth twins (random noise), which ``explain`` runs twice to measure a map's ``stability``."""
    from pytorch_grad_cam import RandomCAM

    return issubclass(method_cls, RandomCAM) or is_smooth(method_cls)


def uses_gradients(method_cls: type, options: dict) -> bool:
    """Whether the method backpropagates: grad-cam sets it in each constructor, so it is read from an instance on
    a one-weight stand-in model, before the real model is loaded."""
    stand_in = torch.nn.Sequential(torch.nn.Linear(1, 1))
    cam = method_cls(model=stand_in, target_layers=[stand_in[0]], **options)
    cam.activations_and_grads.release()
    return cam.uses_gradients


def cam_options(method_cls: type, wrapper: torch.nn.Module, smooth: dict) -> dict:
    """Constructor keywords for ``method_cls`` on ``wrapper`` beyond model and layers: its reshape transform, its
    ablation layer for AblationCAM, and the Smooth options ``smooth``."""
    from pytorch_grad_cam import AblationCAM

    options = dict(smooth, reshape_transform=wrapper.reshape_transform)
    if getattr(wrapper, "answer", None) is not None:
        check_answer_method(method_cls)
    if issubclass(method_cls, AblationCAM):
        options["ablation_layer"] = wrapper.ablation_layer()
    return options


def check_answer_method(method_cls: type) -> None:
    """Refuse a method that cannot explain an answer's score (a log-probability, negative)."""
    from pytorch_grad_cam import AblationCAM

    if issubclass(method_cls, AblationCAM):
        raise InputError("AblationCAM weighs each channel by (score - ablated score) / score and assumes a positive "
                         "score, but an answer's score is a log-probability (negative): its maps come out inverted "
                         "or blank. Explain answers with a gradient method (GradCAM, LayerCAM, HiResCAM) or "
                         "ScoreCAM.")
