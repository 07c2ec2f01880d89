"""Loading images the way users hand them over: a path, a PIL image or an ``HxW[x3|x4]`` uint8 array; and videos, as a
file or a folder of frames."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_rgb(image: ImageInput) -> Image.Image:
    """Return ``image`` as an RGB PIL image; L, LA, RGBA, P, CMYK and 16-bit modes are converted, a file is turned
    as its EXIF orientation says and an animation gives its first frame (:func:`frame_count` tells), bad input is
    refused with a message that says what is accepted."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"Image file not found: {image}")
        try:
            with Image.open(image) as opened:
                # The orientation a viewer shows (EXIF), and the first frame of an animation.
                return to_8bit(ImageOps.exif_transpose(opened)).convert("RGB")
        except OSError as error:
            raise ValueError(f"Cannot read {image} as an image: {error}") from error
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"Expected a uint8 image array with values in 0..255, got dtype {image.dtype}; "
                             "convert with (array * 255).astype(np.uint8) if it holds floats in [0, 1].")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)):
            image = Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image)
        else:
            raise ValueError(f"Expected an HxW, HxWx3 or HxWx4 image array, got shape {image.shape}.")
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a path, a PIL image or a uint8 numpy array, got {type(image).__name__}.")
    image = to_8bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_8bit(image: Image.Image) -> Image.Image:
    """Images of more than 8 bits per channel scaled to 8 bits: PIL's own conversion clips 16-bit and 32-bit integer
    values at 255 (a 16-bit photo turns white), so ``I;16``/``I`` images are divided by 257 (65535 -> 255) and
    float (``F``) images taken as [0, 1] when their values lie there, else as 0..255."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"The image holds {int((~np.isfinite(values)).sum())} NaN or infinite pixel values: "
                             "replace them (e.g. numpy.nan_to_num) before explaining it.")
        values = values * 255 if values.max(initial=0) <= 1 else values
    else:
        return image
    return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), mode="L")


def frame_count(path: str) -> int:
    """How many frames the image file holds (1 for a still image)."""
    with Image.open(path) as opened:
        return int(getattr(opened, "n_frames", 1))


MAX_UPSCALE = 8  # times per side (geometric mean) beyond which the model's input is mostly interpolation


def upscale_warning(name: str, image_size, input_size) -> str:
    """A warning when the model sees the image, of ``image_size`` ``(h, w)``, upscaled more than
    :data:`MAX_UPSCALE` times per side to its input of ``input_size`` (a 5x5 icon made 112x112); ``""`` otherwise."""
    (h, w), (height, width) = image_size, input_size
    scale = (height * width / (h * w)) ** 0.5
    if scale <= MAX_UPSCALE:
        return ""
    return (f"{name} is {w}x{h} pixels; the model sees it upscaled {scale:.0f} times to {width}x{height}, the "
            "least its processor makes: the map shows where it looked on a blown-up copy.")


# ----------------------------------------------------------------------------------------- videos
DEFAULT_FPS = 2.0  # frames per second to sample a video at, or of frames given without their rate: Qwen's own rate
DEFAULT_MAX_FRAMES = 8
MIN_SAMPLED_FRAMES = 4  # the fewest frames a clip is sampled to (Qwen's video processors' min_frames), when it has them
SOURCE_FPS_UNKNOWN = 24.0  # what transformers assumes of a video whose rate is unknown


@dataclass
class VideoFrames:
    """Frames of a video as a user hands it over, sampled: RGB images of one size, and when each was taken
    (``indices`` into the source's ``total`` frames at ``fps`` frames per second; for a folder of frames, ``fps`` is
    the rate they are taken to have been shot at)."""

    frames: List[Image.Image]
    fps: float
    indices: List[int]
    total: int
    names: List[str]  # each frame's file (a folder) or ``frame N`` (a video file)


def sample_indices(total: int, source_fps: float, fps: float, max_frames: int) -> np.ndarray:
    """Which of ``total`` frames shot at ``source_fps`` to keep to sample them at ``fps`` per second: as Qwen3-VL's
    video processor samples, as many as the duration gives at ``fps``, at least :data:`MIN_SAMPLED_FRAMES` (where
    there are that many), at most ``max_frames``, spread evenly from the first frame to the last."""
    count = min(max(int(total / source_fps * fps), min(MIN_SAMPLED_FRAMES, total)), max_frames, total)
    return np.linspace(0, total - 1, count).round().astype(int)


def read_video(path: str, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES) -> VideoFrames:
    """The frames of a video file (decoded with OpenCV) or of a folder of frame images (sorted by name), sampled
    with :func:`sample_indices` (a folder's frames are taken as shot at ``fps``); every check that can fail
    fails here, before any work: a missing path, an empty folder, an unreadable file, frames of different sizes,
    fewer than 2 frames."""
    if not fps > 0:
        raise ValueError(f"--fps must be a positive number of frames per second, got {fps}.")
    if max_frames < 2:
        raise ValueError(f"A video needs at least 2 frames (Qwen's video encoder takes frames in pairs): "
                         f"--max-frames {max_frames} is too few.")
    if os.path.isdir(path):
        extensions = {ext.lower() for ext in Image.registered_extensions()}
        files = sorted(name for name in os.listdir(path) if not name.startswith(".")
                       and os.path.splitext(name)[1].lower() in extensions and os.path.isfile(os.path.join(path, name)))
        if not files:
            raise ValueError(f"No frame images in folder {path}: put the video's frames there as image files (taken in "
                             "the order of their names), or pass a video file.")
        chosen = sample_indices(len(files), fps, fps, max_frames)
        frames, names = [load_rgb(os.path.join(path, files[i])) for i in chosen], [files[i] for i in chosen]
        video = VideoFrames(frames, float(fps), chosen.tolist(), len(files), names)
    elif os.path.isfile(path):
        video = _decode_video(path, fps, max_frames)
    else:
        raise FileNotFoundError(f"Video file or folder not found: {path}")
    if len(video.frames) < 2:
        raise ValueError(f"{path} holds one frame: a video needs at least 2 (Qwen's video encoder takes frames in "
                         "pairs); explain a single picture with --image.")
    check_frame_sizes([frame.size for frame in video.frames], video.names, path)
    return video


def check_frame_sizes(sizes: Sequence[Tuple[int, int]], names: Sequence[str], video: str) -> None:
    """Refuse frames of different sizes (PIL's ``(width, height)``), naming the first frame of each size."""
    first = {}
    for name, size in zip(names, sizes):
        first.setdefault(tuple(size), name)
    if len(first) > 1:
        shown = ", ".join(f"{name} is {w}x{h}" for (w, h), name in first.items())
        raise ValueError(f"The frames of {video} have different sizes ({shown}): a video's frames share one size; "
                         "resize them to one size first.")


def _decode_video(path: str, fps: float, max_frames: int) -> VideoFrames:
    """A video file's sampled frames, decoded with OpenCV (its FFmpeg build reads MP4, AVI, WebM, MOV, ...)."""
    import cv2

    # FFmpeg's own log lines ("moov atom not found") would precede the one error line this raises; a user's
    # setting stays as it is
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise ValueError(f"Cannot read {path} as a video (OpenCV opens no video stream in it): convert it to MP4, "
                             "or pass a folder of its frames as images.")
        source_fps = capture.get(cv2.CAP_PROP_FPS)
        source_fps = source_fps if 0 < source_fps < 1000 else SOURCE_FPS_UNKNOWN
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if not 0 < total < 10 ** 7:  # not reported (an image sequence): count by decoding
            total = 0
            while capture.grab():
                total += 1
            capture.release()
            capture.open(path)
        wanted, frames, indices = set(sample_indices(total, source_fps, fps, max_frames).tolist()), [], []
        for index in range(total):
            if not capture.grab():  # the stream ends before its reported length: keep what was decoded
                break
            if index in wanted:
                ok, bgr = capture.retrieve()
                if ok:
                    frames.append(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
                    indices.append(index)
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"Cannot read {path} as a video (OpenCV decodes no frame of it): convert it to MP4, or pass a "
                         "folder of its frames as images.")
    return VideoFrames(frames, float(source_fps), indices, total, [f"frame {i}" for i in indices])
