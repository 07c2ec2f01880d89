"""Qwen's flat vision rows (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V): images to the processor's
``pixel_values`` and back, and the order in which Qwen2.5-VL's windowed vision encoder holds merge blocks."""
from __future__ import annotations

from typing import Tuple

import torch


def patchify(images: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` images to Qwen's flat ``pixel_values`` ``(B*h*w, C*T*p*p)``: patches in 2x2 merge-block
    order, each repeated over the temporal axis, exactly as ``Qwen2VLImageProcessor`` lays them out; differentiable."""
    b, c, height, width = images.shape
    gh, gw = height // patch_size, width // patch_size
    patches = images.reshape(b, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6)
    patches = patches.expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    return patches.reshape(b * gh * gw, c * temporal_patch_size * patch_size * patch_size)


def unpatchify(pixel_values: torch.Tensor, grid_hw: Tuple[int, int], patch_size: int, merge_size: int,
               temporal_patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for one image: ``(h*w, C*T*p*p)`` to ``(1, C, H, W)`` (first temporal frame)."""
    gh, gw = grid_hw
    x = pixel_values.reshape(gh // merge_size, gw // merge_size, merge_size, merge_size, -1, temporal_patch_size,
                             patch_size, patch_size)[:, :, :, :, :, 0]
    x = x.permute(4, 0, 2, 5, 1, 3, 6)  # C, gh/m, m, p, gw/m, m, p
    return x.reshape(1, -1, gh * patch_size, gw * patch_size)


def vision_window_index(visual: torch.nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """The order in which Qwen2.5-VL's vision encoder holds merge blocks (grouped by attention window);
    the identity for Qwen2-VL, whose encoder has no windows."""
    n_merged = int((grid_thw.prod(-1) // visual.spatial_merge_size ** 2).sum())
    if not hasattr(visual, "fullatt_block_indexes"):
        return torch.arange(n_merged)
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # transformers 4.x keeps it as a method of the encoder
        return visual.get_window_index(grid_thw)[0].cpu()
    return get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]
