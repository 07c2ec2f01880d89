"""Classify an image and explain the prediction in one call, on a torchvision or timm classifier.

    result = classify_and_explain(model, "cat.jpg", class_names=names)
    result["class_name"], result["confidence"], result["map"], result["overlay"], result["check"].verdict
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.image import ImageInput
from pytorch_grad_cam_vlm.methods.auto import MethodSpec, explain
from pytorch_grad_cam_vlm.methods.sweep import LayerSpec
from pytorch_grad_cam_vlm.models.classifier import ClassifierWrapper
from pytorch_grad_cam_vlm.visualize import overlay


def classify_and_explain(model: torch.nn.Module, image: ImageInput, class_names: Optional[Sequence[str]] = None,
                         method: MethodSpec = "auto", layers: LayerSpec = "auto",
                         options: Optional[dict] = None) -> dict:
    """The predicted class of ``image`` and its map. ``model``: a :class:`ClassifierWrapper`, or a torchvision / timm
    classifier to wrap (default preprocessing, ``class_names``). ``method`` and ``layers`` as for
    :func:`~pytorch_grad_cam_vlm.explain` (default: the candidate method and layer whose map ranks best on the
    deletion check). Returns ``class_index``, ``class_name``, ``confidence`` (softmax), ``map`` ``(H, W)`` in
    [0, 1] on the preprocessed input, ``overlay`` ``(H, W, 3)`` uint8, ``method``, ``layer`` (an index into
    ``wrapper.layers``), ``check`` (:class:`~pytorch_grad_cam_vlm.MapCheck`), ``input`` (the preprocessed
    ``(1, 3, H, W)``) and ``explanation`` (every candidate)."""
    wrapper = model if isinstance(model, ClassifierWrapper) else ClassifierWrapper(model, class_names=class_names)
    x = wrapper.preprocess(image)
    index, name, confidence = wrapper.predict(x)
    result = explain(wrapper, x, [ClassifierOutputTarget(index)], method, layers, options=options)
    return dict(class_index=index, class_name=name, confidence=confidence, map=result.maps[0],
                overlay=overlay(wrapper.to_rgb(x)[0], result.maps[0]), method=result.methods[0],
                layer=result.layers[0], check=result.checks[0], input=x, explanation=result)
