"""Qwen's flat vision rows (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V): images and videos to the processor's
``pixel_values`` / ``pixel_values_videos`` and back, and the order in which Qwen2.5-VL's windowed vision encoder holds
merge blocks."""
from __future__ import annotations

from typing import Tuple

import torch


def patchify(images: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` images to Qwen's flat ``pixel_values`` ``(B*h*w, C*T*p*p)``: patches in 2x2 merge-block
    order, each repeated over the temporal axis, exactly as ``Qwen2VLImageProcessor`` lays them out (an image is a
    video of one frame, padded to a temporal patch by repeating it); differentiable."""
    return patchify_video(images[:, None], patch_size, merge_size, temporal_patch_size)


def patchify_video(frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """``(B, T, C, H, W)`` videos to Qwen's flat ``pixel_values_videos`` ``(B*t*h*w, C*T*p*p)``, exactly as the
    video processor's ``patchify`` lays them out: ``T`` padded to a multiple of ``temporal_patch_size`` by repeating
    the last frame, then temporal patch by temporal patch, patches in 2x2 merge-block order, each holding its
    ``temporal_patch_size`` frames; differentiable."""
    b, t, c, height, width = frames.shape
    pad = -t % temporal_patch_size
    if pad:
        frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    gt, gh, gw = (t + pad) // temporal_patch_size, height // patch_size, width // patch_size
    patches = frames.reshape(b, gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                             gw // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(b * gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)


def unpatchify(pixel_values: torch.Tensor, grid_hw: Tuple[int, int], patch_size: int, merge_size: int,
               temporal_patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for one image: ``(h*w, C*T*p*p)`` to ``(1, C, H, W)`` (first temporal frame)."""
    return unpatchify_video(pixel_values, (1,) + tuple(grid_hw), patch_size, merge_size, temporal_patch_size)[:1]


def unpatchify_video(pixel_values: torch.Tensor, grid_thw: Tuple[int, int, int], patch_size: int, merge_size: int,
                     temporal_patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify_video` for one video: ``(t*h*w, C*T*p*p)`` to its frames ``(t*T, C, H, W)``
    (padding frames included)."""
    gt, gh, gw = (int(v) for v in grid_thw)
    x = pixel_values.reshape(gt, gh // merge_size, gw // merge_size, merge_size, merge_size, -1, temporal_patch_size,
                             patch_size, patch_size)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # t, T, C, gh/m, m, p, gw/m, m, p
    return x.reshape(gt * temporal_patch_size, -1, gh * patch_size, gw * patch_size)


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
