"""How layer choices name a layer: an index into ``wrapper.layers`` (a VLM's decoder layers, CLIP's vision layers,
a classifier's stages), or :data:`PROJECTOR`, the module that turns a VLM's vision encoder output into the decoder's
image tokens (``wrapper.projector``: Qwen's merger, Idefics3's connector, the multimodal projector of the others)."""
from __future__ import annotations

from typing import List, Sequence, Union

Layer = Union[int, str]
PROJECTOR = "projector"


def layer_modules(wrapper, layers: Sequence[Layer]) -> List:
    """The modules of chosen ``layers`` of ``wrapper``: ``wrapper.layers[k]``, or ``wrapper.projector``."""
    return [wrapper.projector if layer == PROJECTOR else wrapper.layers[layer] for layer in layers]


def has_projector(wrapper) -> bool:
    """Whether ``wrapper`` offers :data:`PROJECTOR` as a layer choice (the VLM wrappers; not CLIP, a classifier or
    a vision-encoder view)."""
    return hasattr(type(wrapper), PROJECTOR)


def layer_depth(layer: Layer) -> int:
    """A sort key in the order the model runs its layers: the projector (-1) before decoder layer 0."""
    return -1 if layer == PROJECTOR else int(layer)


def layer_name(layer: Layer, kind: str = "") -> str:
    """``"layer 3"`` (``"decoder layer 3"`` given the ``kind`` of layers), or ``"projector"``: how reports, titles
    and warnings name a chosen layer."""
    return PROJECTOR if layer == PROJECTOR else f"{kind} layer {layer}".lstrip()
