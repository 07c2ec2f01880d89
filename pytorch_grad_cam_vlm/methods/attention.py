"""Raw attention as a baseline explanation, with grad-cam's call signature so that ROAD and the benchmark score it
like any other method.

:class:`AttentionMap` reads, at each target layer, the attention of one query token to the image tokens: for
Qwen2-VL / Qwen2.5-VL the last position of the prompt (the one that predicts the answer) attending to the image
tokens of a decoder layer, the common "Qwen VL attention visualization" (likewise for LLaVA, Gemma 3, Idefics3 and
InternVL, whose wrappers place the image tokens on their maps' grid); for CLIP the class token attending to the
patch tokens of a vision layer. :class:`AttentionRollout` (Abnar & Zuidema, 2020) multiplies the attention of
consecutive layers, with the residual connection as an identity, and reads the same row of the product.

Both run the model with eager attention for the call (the only implementation that returns attention weights) and
restore the previous implementation afterwards. Targets are not used: attention does not depend on the output.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import scale_cam_image

HeadFusion = Union[str, int]


def fuse_heads(weights: torch.Tensor, head_fusion: HeadFusion) -> torch.Tensor:
    """Attention weights ``(B, heads, ...)`` to ``(B, ...)``: the mean or the max over heads, or one head."""
    if head_fusion == "mean":
        return weights.mean(dim=1)
    if head_fusion == "max":
        return weights.amax(dim=1)
    if not -weights.shape[1] <= head_fusion < weights.shape[1]:
        raise ValueError(f"Head {head_fusion} does not exist: the layer has {weights.shape[1]} heads.")
    return weights[:, head_fusion]


def discard_lowest(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero, in each row of ``attention`` ``(..., queries, keys)``, the ``ratio`` fraction of its smallest weights
    among the keys it attends to (masked keys, already zero, are not counted), as in Gildenblat's ViT rollout."""
    if ratio == 0:
        return attention
    attended = attention > 0
    k = (attended.sum(dim=-1, keepdim=True) * ratio).floor().long()
    ranked = torch.where(attended, attention, torch.full_like(attention, float("inf"))).sort(dim=-1).values
    threshold = ranked.gather(-1, (k - 1).clamp(min=0))
    return attention.masked_fill(attended & (attention <= threshold) & (k > 0), 0)


def attention_rollout(attentions: Sequence[torch.Tensor], discard_ratio: float = 0.0) -> torch.Tensor:
    """Abnar & Zuidema's rollout of head-fused attention matrices ``(B, S, S)`` listed from the first layer to the
    last: each layer's attention plus the identity (the residual path), rows renormalised, multiplied through."""
    rollout = None
    for attention in attentions:
        attention = discard_lowest(attention.double(), discard_ratio)
        attention = attention + torch.eye(attention.shape[-1], dtype=attention.dtype)
        attention = attention / attention.sum(dim=-1, keepdim=True)
        rollout = attention if rollout is None else attention @ rollout
    return rollout


class AttentionMap(BaseCAM):
    """The attention of the query token to the image tokens at each target layer, heads fused by ``head_fusion``
    (``"mean"``, ``"max"`` or a head index), on the image's grid; several target layers are averaged, as grad-cam
    does. ``AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[i]], head_fusion="mean")``.

    ``target_layers`` are decoder layers of a :class:`~pytorch_grad_cam_vlm.QwenVLWrapper` (or of any wrapper with
    ``token_geometry()``: LLaVA, Gemma 3, Idefics3, InternVL) or vision layers of a CLIP
    :class:`~pytorch_grad_cam_vlm.CLIPWrapper` (SigLIP has no class token to read), or their ``self_attn`` modules.
    ``reshape_transform`` is accepted for grad-cam's signature and not used: the wrapper's layout maps token
    positions to the grid. ``eigen_smooth`` has nothing to smooth on a single map and is ignored.
    """

    def __init__(self, model: torch.nn.Module, target_layers: List[torch.nn.Module], head_fusion: HeadFusion = "mean",
                 reshape_transform: Optional[Callable] = None) -> None:
        if not (head_fusion in ("mean", "max") or isinstance(head_fusion, (int, np.integer))
                and not isinstance(head_fusion, bool)):
            raise ValueError(f"head_fusion must be 'mean', 'max' or a head index, got {head_fusion!r}.")
        _check_has_query_token(model)
        self.head_fusion = head_fusion
        # A function, not a bound method: grad-cam's hooks hold it, and a reference back to this object would keep
        # the hooks alive after the object is dropped (grad-cam removes them when it is deleted).
        super().__init__(model, [_attention_module(layer, model) for layer in target_layers],
                         reshape_transform=self._reader(model), uses_gradients=False)

    def forward(self, input_tensor: torch.Tensor, targets: Optional[List[torch.nn.Module]],
                eigen_smooth: bool = False) -> np.ndarray:
        with torch.no_grad(), self.model.eager_attention():
            return super().forward(input_tensor, targets, eigen_smooth)

    def _reader(self, model: torch.nn.Module) -> Callable:
        return partial(query_attention_on_grid, wrapper=model, head_fusion=self.head_fusion)

    def __del__(self) -> None:
        if hasattr(self, "activations_and_grads"):  # not when the constructor refused its arguments
            super().__del__()

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth=False):
        return activations[:, 0]


class AttentionRollout(AttentionMap):
    """Attention rollout (Abnar & Zuidema, 2020) through the target layers, which should be consecutive, e.g.
    ``wrapper.decoder_layers``: per layer the heads are fused, the lowest ``discard_ratio`` of each row's weights
    zeroed, the identity added and rows renormalised; the product's row of the query token gives one map."""

    def __init__(self, model: torch.nn.Module, target_layers: List[torch.nn.Module], head_fusion: HeadFusion = "mean",
                 discard_ratio: float = 0.0, reshape_transform: Optional[Callable] = None) -> None:
        if not 0 <= discard_ratio < 1:
            raise ValueError(f"discard_ratio must lie in [0, 1), got {discard_ratio}.")
        self.discard_ratio = discard_ratio
        super().__init__(model, target_layers, head_fusion, reshape_transform)

    def _reader(self, model: torch.nn.Module) -> Callable:
        return partial(fused_attention, head_fusion=self.head_fusion)

    def compute_cam_per_layer(self, input_tensor: torch.Tensor, targets, eigen_smooth: bool) -> List[np.ndarray]:
        # Hooks run in execution order, so the matrices are listed from the first layer to the last.
        rollout = attention_rollout(self.activations_and_grads.activations, self.discard_ratio)
        cam = image_row_on_grid(rollout[:, token_geometry(self.model)[0]], self.model)[:, 0].float().numpy()
        return [scale_cam_image(cam, self.get_target_width_height(input_tensor))[:, None]]


def query_attention_on_grid(output, wrapper: torch.nn.Module, head_fusion: HeadFusion) -> torch.Tensor:
    """An attention module's output, with weights ``(B, heads, S, S)``, to the head-fused attention of the query
    token to the image tokens on their grid, ``(B, 1, h, w)``."""
    row = fuse_heads(_attention_weights(output)[:, :, token_geometry(wrapper)[0]], head_fusion)
    return image_row_on_grid(row, wrapper).float()


def image_row_on_grid(row: torch.Tensor, wrapper: torch.nn.Module) -> torch.Tensor:
    """A value per sequence position ``(B, S)`` to ``(B, 1, h, w)`` on the image grid of the wrapper's latest forward
    pass: the wrapper's own placement where it has ``image_row_to_grid`` (the families that place several images'
    tokens, tiles or a video's frames on one canvas, as their decoder maps), else the image tokens in raster order
    (one image's grid: Mistral 3, Gemma 4, CLIP's patches)."""
    if hasattr(wrapper, "image_row_to_grid"):
        return wrapper.image_row_to_grid(row)
    _, keys, (h, w) = token_geometry(wrapper)
    return row[:, keys.to(row.device)].reshape(row.shape[0], 1, h, w)


def fused_attention(output, head_fusion: HeadFusion) -> torch.Tensor:
    """An attention module's output to its head-fused ``(B, S, S)`` attention matrix."""
    return fuse_heads(_attention_weights(output), head_fusion).float()


def token_geometry(wrapper: torch.nn.Module) -> Tuple[int, torch.Tensor, Tuple[int, int]]:
    """For the wrapper's latest forward pass: the query position, the sequence positions of the image tokens in
    raster order, and their grid ``(h, w)``."""
    from pytorch_grad_cam_vlm.models.qwen_vl import QwenVLWrapper

    if hasattr(wrapper, "token_geometry"):  # LLaVA, Gemma 3, Idefics3, InternVL: the wrapper says
        return wrapper.token_geometry()
    if isinstance(wrapper, QwenVLWrapper):
        (gh, gw), m = wrapper.layout.patch_grid, wrapper.merge_size
        return -1, wrapper.layout.vision_positions, (gh // m, gw // m)
    h, w = wrapper.grid  # CLIP: the class token attending to the patches
    return 0, torch.arange(1, 1 + h * w), (h, w)


def _check_has_query_token(model: torch.nn.Module) -> None:
    """Refuse a model whose query token and image tokens the attention maps cannot find: accepted are
    :class:`QwenVLWrapper`, a CLIP :class:`CLIPWrapper` with a class token, and any wrapper with ``token_geometry()``
    (LLaVA, Gemma 3, Idefics3, InternVL)."""
    from pytorch_grad_cam_vlm.models.clip import CLIPWrapper
    from pytorch_grad_cam_vlm.models.qwen_vl import QwenVLWrapper

    if isinstance(model, CLIPWrapper) and model.prefix_tokens == 0:
        raise ValueError(f"{model.family} has no class token whose attention could be read: it pools its patches "
                         "with an attention head outside the encoder. Use a gradient method such as GradCAM on "
                         "wrapper.vision_layers.")
    if not (isinstance(model, (QwenVLWrapper, CLIPWrapper)) or callable(getattr(model, "token_geometry", None))):
        raise TypeError("Attention maps need a wrapper that says where its query token and image tokens lie: a "
                        "QwenVLWrapper, a CLIPWrapper, or a wrapper with a token_geometry() method (returning the "
                        "query position, the image tokens' positions and their grid) such as LlavaWrapper, "
                        f"Gemma3Wrapper, Idefics3Wrapper or InternVLWrapper; got {type(model).__name__}.")


def _attention_module(layer: torch.nn.Module, wrapper: torch.nn.Module) -> torch.nn.Module:
    """The module whose output carries the attention weights: a layer's ``self_attn``, or that module itself.
    Linear-attention layers (Qwen3.5's Gated DeltaNet) have no attention weights: refused, naming the layers that
    have them."""
    if "linear_attention" in (getattr(layer, "block_type", None), getattr(layer, "layer_type", None)):
        decoder = getattr(wrapper, "decoder_layers", [])
        where = next((f"Decoder layer {i}" for i, d in enumerate(decoder) if layer is d or layer in d.modules()),
                     f"{type(layer).__name__}")
        full = getattr(wrapper, "full_attention_layers", [])
        raise ValueError(f"{where} is a linear-attention (Gated DeltaNet) layer, which computes no softmax "
                         "attention weights to read. Use a full-attention layer: wrapper.decoder_layers[i] for i in "
                         f"{full} (wrapper.full_attention_layers).")
    attention = getattr(layer, "self_attn", None)
    if attention is not None:
        return attention
    if type(layer).__name__.endswith("Attention"):
        return layer
    raise ValueError(f"{type(layer).__name__} has no self_attn module: pass decoder layers "
                     "(wrapper.decoder_layers[i]) of Qwen-VL or vision layers (wrapper.vision_layers[i]) of CLIP.")


def _attention_weights(output) -> torch.Tensor:
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        raise RuntimeError("The attention module returned no attention weights: run under wrapper.eager_attention() "
                           "(AttentionMap does) and pass layers whose self_attn returns (output, weights).")
    return weights
