"""A video in one prompt (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5), as one input that grad-cam runs on: its frames in
a row on one canvas.

Qwen's video processor resizes every frame of a clip to one size (whole token cells), pads the frame count to a
multiple of the temporal patch (2) by repeating the last frame, and cuts the clip into tubes of 2 frames x 14 (16)
pixels: one vision token per 2x2 merge block of a temporal patch, so each token covers one cell of two consecutive
frames (a *frame pair*). grad-cam needs one ``(B, 3, H, W)`` tensor, so the T frames lie left to right on one canvas,
one token cell apart and one from each end (:func:`frame_row`); pixels between them hold 0 (the mean colour) and reach
nothing. The
wrapper's ``forward`` cuts the frames back out, stacks them ``(B, T, 3, h, w)`` and patchifies them exactly as the
video processor does (:func:`~pytorch_grad_cam_vlm.models.qwen_patches.patchify_video`), with the processor's own
``video_grid_thw``, ``<|video_pad|>`` tokens, ``mm_token_type_ids`` and timing (Qwen2.5-VL's
``second_per_grid_ts``, Qwen3-VL's ``<t seconds>`` text before each frame pair). ``reshape_transform`` places each
frame pair's token grid on both of its frames' boxes (an odd last frame's pair on that frame alone), zeros between
them: a map of the canvas is one map per frame pair, each on its frames (:func:`pair_maps`). The gaps keep grad-cam's
bilinear upsampling of the token grid from carrying one pair's map onto its neighbour's frames, and give every frame
the same surroundings, so both frames of a pair get the same map, pixel for pixel.

    x = wrapper.preprocess_video(frames, fps=2)     # frames: paths, PIL images or uint8 arrays, one size
    result = explain(wrapper, x)                     # or any grad-cam method on x
    maps = pair_maps(result.model_maps, wrapper.video)   # (B, pairs, h, w)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.image import DEFAULT_FPS, check_frame_sizes, load_rgb
from pytorch_grad_cam_vlm.models.frame import ImageFrame
from pytorch_grad_cam_vlm.models.multi_image import ImageBoxes, canvas, crops, mass_shares, place
from pytorch_grad_cam_vlm.models.qwen_patches import patchify_video, unpatchify_video, vision_window_index


@dataclass(frozen=True)
class VideoClip:
    """The frames of one video as the wrapper explains them: each frame's box on the canvas, the frames' size before
    the processor resized them, and when each was taken (``frame_indices`` into a source of ``total_frames`` frames at
    ``fps``, as transformers' ``VideoMetadata`` holds them)."""

    boxes: ImageBoxes
    source_size: Tuple[int, int]  # (height, width) of the user's frames
    fps: float
    frame_indices: Tuple[int, ...]
    total_frames: int
    temporal_patch_size: int = 2

    @property
    def n_frames(self) -> int:
        return len(self.boxes)

    @property
    def frame_size(self) -> Tuple[int, int]:
        """``(height, width)`` of each frame on the canvas, as the processor resized it."""
        return self.boxes.boxes[0][2:]

    @property
    def pairs(self) -> Tuple[Tuple[int, ...], ...]:
        """The frames of each temporal patch: ``((0, 1), (2, 3), ...)``, an odd last frame alone (the processor
        repeats it to fill its patch)."""
        step = self.temporal_patch_size
        return tuple(tuple(range(k, min(k + step, self.n_frames))) for k in range(0, self.n_frames, step))

    @property
    def pair_of_frame(self) -> Tuple[int, ...]:
        """The frame pair (temporal patch) of each frame."""
        return tuple(k for k, pair in enumerate(self.pairs) for _ in pair)

    @property
    def timestamps(self) -> List[float]:
        """Each frame's time in seconds in the source."""
        return [index / self.fps for index in self.frame_indices]

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the frames as sampled from the source (their playback rate)."""
        span = self.frame_indices[-1] - self.frame_indices[0]
        return (self.n_frames - 1) * self.fps / span if span > 0 else self.fps

    def metadata(self) -> Dict[str, object]:
        """transformers' video metadata of the clip: what the processor reads the timing from."""
        return {"fps": self.fps, "frames_indices": list(self.frame_indices), "total_num_frames": self.total_frames}

    def pair_boxes(self) -> ImageBoxes:
        """Each frame pair's first frame's box: where :func:`pair_maps` reads a pair's map."""
        return ImageBoxes(tuple(self.boxes.boxes[pair[0]] for pair in self.pairs))


@dataclass(frozen=True)
class FrameRow(ImageBoxes):
    """Frames' boxes in a row with ``gap`` pixels between them and at both ends of the canvas."""

    gap: int = 0

    @property
    def canvas_size(self) -> Tuple[int, int]:
        height, width = super().canvas_size
        return height, width + self.gap


def frame_row(n_frames: int, size: Tuple[int, int], gap: int) -> FrameRow:
    """Boxes of ``n_frames`` frames of ``size`` ``(height, width)`` left to right, ``gap`` pixels apart and from
    the canvas's ends."""
    height, width = size
    return FrameRow(tuple((0, gap + k * (width + gap), height, width) for k in range(n_frames)), gap)


def load_frames(frames) -> List[np.ndarray]:
    """The frames as RGB uint8 arrays ``(H, W, 3)`` of one size: from a sequence of paths, PIL images or arrays, or
    one ``(T, H, W, 3)`` uint8 array; at least 2 (one temporal patch)."""
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        frames = list(frames)
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
        raise TypeError(f"Expected the video's frames as a list of images (paths, PIL images or uint8 arrays) or a "
                        f"(T, H, W, 3) uint8 array, got {type(frames).__name__}.")
    if len(frames) < 2:
        raise ValueError(f"A video needs at least 2 frames (Qwen's video encoder takes frames in pairs), got "
                         f"{len(frames)}: explain a single frame as an image with wrapper.preprocess(frame).")
    arrays = [np.asarray(load_rgb(frame)) for frame in frames]
    check_frame_sizes([a.shape[1::-1] for a in arrays], [f"frame {k}" for k in range(len(arrays))], "the video")
    return arrays


def prepare_video(wrapper, frames, fps: float = DEFAULT_FPS, frame_indices: Optional[Sequence[int]] = None,
                  total_frames: Optional[int] = None) -> Tuple[torch.Tensor, VideoClip]:
    """The canvas ``(1, 3, H, W)`` float32 of ``frames`` in a row and its :class:`VideoClip`: each frame resized and
    normalised by the model's own video processor (no frame sampling: every frame given is explained)."""
    arrays = load_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be a positive number of frames per second, got {fps!r}.")
    indices = tuple(range(len(arrays))) if frame_indices is None else tuple(int(i) for i in frame_indices)
    if len(indices) != len(arrays):
        raise ValueError(f"Got {len(indices)} frame indices for {len(arrays)} frames.")
    encoded = wrapper.processor.video_processor(videos=[np.stack(arrays)], return_tensors="pt",
                                                do_sample_frames=False)
    grid = encoded["video_grid_thw"][0]
    stacked = unpatchify_video(encoded["pixel_values_videos"].float(), tuple(grid.tolist()), wrapper.patch_size,
                               wrapper.merge_size, wrapper.temporal_patch_size)[:len(arrays)]
    boxes = frame_row(len(arrays), tuple(stacked.shape[2:]), wrapper.token_cell)
    clip = VideoClip(boxes, arrays[0].shape[:2], float(fps), indices,
                     int(total_frames) if total_frames is not None else max(indices) + 1,
                     wrapper.temporal_patch_size)
    return canvas(list(stacked[:, None]), boxes), clip


def check_video_canvas(clip: VideoClip, height: int, width: int) -> None:
    """Refuse an input that is not the canvas the video's frames were prepared on."""
    if clip.boxes.canvas_size != (height, width):
        raise ValueError(f"The video's {clip.n_frames} frames were prepared as a canvas of "
                         f"{clip.boxes.canvas_size[0]}x{clip.boxes.canvas_size[1]} pixels, got {height}x{width}: "
                         "prepare them again with wrapper.preprocess_video(frames).")


def video_media(clip: VideoClip) -> Dict[str, object]:
    """The processor's keywords for a placeholder of the clip: black frames of its size and count (taken as they
    are, with the caller's ``do_resize=False``), its timing, no frame sampling."""
    return {"videos": [np.zeros((clip.n_frames,) + tuple(clip.frame_size) + (3,), dtype=np.uint8)],
            "video_metadata": [clip.metadata()], "do_sample_frames": False}


def frames_of(x: torch.Tensor, clip: VideoClip) -> torch.Tensor:
    """The frames ``(B, T, 3, h, w)`` cut out of canvases ``x`` ``(B, 3, H, W)``."""
    return torch.stack(crops(x, clip.boxes), dim=1)


# ----------------------------------------------------------------------------------------- maps
def pair_maps(maps: np.ndarray, clip: VideoClip) -> np.ndarray:
    """``(B, P, h, w)``: each frame pair's map, cut from canvas maps ``(B, H, W)`` (or one ``(H, W)``) at its first
    frame's box (both frames of a pair hold the same map)."""
    maps = np.asarray(maps)
    single = maps.ndim == 2
    maps = maps[None] if single else maps
    out = np.stack([maps[:, top:top + h, left:left + w] for top, left, h, w in clip.pair_boxes().boxes], axis=1)
    return out[0] if single else out


def pair_maps_on_frames(maps: np.ndarray, clip: VideoClip) -> np.ndarray:
    """:func:`pair_maps` carried onto the user's frames: ``(B, P, H0, W0)`` (or ``(P, H0, W0)``) float32."""
    return ImageFrame.resized(clip.source_size, clip.frame_size).to_image(pair_maps(maps, clip))


def pair_shares(maps: np.ndarray, clip: VideoClip) -> np.ndarray:
    """``(B, P)``: the share of each canvas map's mass that lies on each frame pair (NaN for a map without mass)."""
    return mass_shares(maps, clip.pair_boxes())


# ----------------------------------------------------------------------------------------- Qwen's flat vision rows
def qwen_video_pixel_values(wrapper, x: torch.Tensor, clip: VideoClip) -> torch.Tensor:
    """Qwen's ``pixel_values_videos`` for canvases ``x`` ``(B, 3, H, W)``: one video per sample, its frames cut out
    of the canvas and patchified as the video processor does."""
    return patchify_video(frames_of(x, clip), wrapper.patch_size, wrapper.merge_size, wrapper.temporal_patch_size)


def qwen_video_reshape(wrapper, hidden: torch.Tensor) -> torch.Tensor:
    """:meth:`QwenVLWrapper.reshape_transform` for a video: each frame pair's tokens (decoder layers, mergers) or
    patches (vision blocks) on its grid, placed on each of its frames' boxes on the canvas's grid."""
    layout, b, m = wrapper.layout, wrapper.batch_size, wrapper.merge_size
    clip = layout.video
    gt, gh, gw = (int(v) for v in layout.grid_thw[0])
    if hidden.dim() == 3:  # decoder layer: the video tokens, frame pair by frame pair, raster order
        tokens = hidden[:, layout.vision_positions.to(hidden.device)]
        grids, cell = tokens.reshape(b, gt, gh // m, gw // m, -1).permute(0, 1, 4, 2, 3), wrapper.token_cell
    elif hidden.dim() == 2:
        order = torch.argsort(vision_window_index(wrapper.visual, layout.grid_thw.repeat(b, 1))).to(hidden.device)
        if hidden.shape[0] == b * gt * gh * gw:  # vision block: merge blocks in window order
            blocks = hidden.reshape(-1, m * m, hidden.shape[-1])[order]
            grids = blocks.reshape(b, gt, gh // m, gw // m, m, m, -1).permute(0, 1, 6, 2, 4, 3, 5)
            grids, cell = grids.reshape(b, gt, -1, gh, gw), wrapper.patch_size
        elif hidden.shape[0] == b * gt * gh * gw // (m * m):  # merger: one row per merge block
            grids = hidden[order].reshape(b, gt, gh // m, gw // m, -1).permute(0, 1, 4, 2, 3)
            cell = wrapper.token_cell
        else:
            raise ValueError(f"A vision hidden state of {hidden.shape[0]} rows fits neither the {b * gt * gh * gw} "
                             f"patches nor the {b * gt * gh * gw // (m * m)} merged cells of the latest video.")
    else:
        raise ValueError(f"Cannot map a hidden state of shape {tuple(hidden.shape)} to the video's frames.")
    per_frame = [grids[:, k].float() for k in clip.pair_of_frame]
    return place(per_frame, clip.boxes, cell)
