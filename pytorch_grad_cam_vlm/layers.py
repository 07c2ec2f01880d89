"""How layer choices name a layer: an index into ``wrapper.layers`` (a VLM's decoder layers, CLIP's vision layers,
a classifier's stages), or :data:`PROJECTOR`, the module that turns a VLM's vision encoder output into the decoder's
image tokens (``wrapper.projector``: Qwen's merger, Idefics3's connector, the multimodal projector of the others).
:data:`INPUT` names no module: the input pixels, where ``explain``'s occlusion fallback takes its map."""
from __future__ import annotations

from typing import List, Sequence, Union

Layer = Union[int, str]
PROJECTOR = "projector"
INPUT = "input"


def layer_modules(wrapper, layers: Sequence[Layer]) -> List:
    """The modules of chosen ``layers`` of ``wrapper``: ``wrapper.layers[k]``, or ``wrapper.projector``."""
    return [wrapper.projector if layer == PROJECTOR else wrapper.layers[layer] for layer in layers]


def has_projector(wrapper) -> bool:
    """Whether ``wrapper`` offers :data:`PROJECTOR` as a layer choice (the VLM wrappers; not CLIP, a classifier or
    a vision-encoder view)."""
    return hasattr(type(wrapper), PROJECTOR)


def layer_depth(layer: Layer) -> int:
    """A sort key in the order the model runs its layers: the input (-2) and the projector (-1) before decoder layer
    0."""
    return -2 if layer == INPUT else -1 if layer == PROJECTOR else int(layer)


def layer_name(layer: Layer, kind: str = "") -> str:
    """``"layer 3"`` (``"decoder layer 3"`` given the ``kind`` of layers), or ``"projector"``: how reports, titles
    and warnings name a chosen layer; ``"input"`` for :data:`INPUT`."""
    return layer if layer in (PROJECTOR, INPUT) else f"{kind} layer {layer}".lstrip()
