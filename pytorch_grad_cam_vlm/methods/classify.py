"""Classify an image and explain the prediction in one call, on a torchvision or timm classifier.

    result = classify_and_explain(model, "cat.jpg", class_names=names)
    result["class_name"], result["confidence"], result["map"], result["overlay"], result["check"].verdict
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.methods.auto import MethodSpec, explain
from pytorch_grad_cam_vlm.methods.sweep import LayerSpec
from pytorch_grad_cam_vlm.models.classifier import ClassifierWrapper
from pytorch_grad_cam_vlm.visualize import overlay


def classify_and_explain(model: torch.nn.Module, image: ImageInput, class_names: Optional[Sequence[str]] = None,
                         method: MethodSpec = "auto", layers: LayerSpec = "auto",
                         options: Optional[dict] = None, fallback: Optional[bool] = None) -> dict:
    """The predicted class of ``image`` and its map. ``model``: a :class:`ClassifierWrapper`, or a torchvision / timm
    classifier to wrap (default preprocessing, ``class_names``). ``method`` and ``layers`` as for
    :func:`~pytorch_grad_cam_vlm.explain` (default: the candidate method and layer whose map ranks best on the
    deletion check; ``fallback`` as for ``explain``). Returns ``class_index``, ``class_name``, ``confidence``
    (softmax), ``map`` ``(H0, W0)`` in [0, 1] on the image (NaN outside the center crop the model saw;
    ``docs/frames.md``), ``overlay`` ``(H0, W0, 3)`` uint8 drawn on the image (the unseen part hatched grey),
    ``image`` ``(H0, W0, 3)`` in [0, 1], ``model_map`` ``(H, W)`` on the preprocessed input, ``method``, ``layer``
    (an index into ``wrapper.layers``, or ``"input"`` for the occlusion fallback's map), ``check``
    (:class:`~pytorch_grad_cam_vlm.MapCheck`), ``input`` (the preprocessed ``(1, 3, H, W)``) and ``explanation``
    (every candidate; ``explanation.frames[0]`` carries any of its maps onto the image)."""
    wrapper = model if isinstance(model, ClassifierWrapper) else ClassifierWrapper(model, class_names=class_names)
    picture = load_rgb(image)
    x = wrapper.preprocess(picture)
    index, name, confidence = wrapper.predict(x)
    result = explain(wrapper, x, [ClassifierOutputTarget(index)], method, layers, options=options,
                     image_size=picture.size[::-1], fallback=fallback)
    rgb = np.asarray(picture, dtype=np.float32) / 255
    return dict(class_index=index, class_name=name, confidence=confidence, map=result.maps[0],
                overlay=overlay(rgb, result.maps[0]), image=rgb, model_map=result.model_maps[0],
                method=result.methods[0], layer=result.layers[0], check=result.checks[0], input=x,
                explanation=result)
