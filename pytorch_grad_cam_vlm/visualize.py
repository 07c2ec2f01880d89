"""The visual modes of Smooth Grad-CAM for Qwen2.5-VL as PNG figures: one layer (heatmap and overlay), a grid of
layers, a multi-layer figure (heatmap and overlay per layer) and an early/middle/late comparison; raw maps as .npy.

Figures have an exact pixel size: panels of :data:`PANEL_WIDTH` pixels (height by the image's aspect ratio), each
under a label strip of :data:`LABEL_HEIGHT` pixels, below a title strip of :data:`TITLE_HEIGHT` pixels. Heatmaps use
OpenCV's jet colormap on the fixed range [0, 1], the colours of grad-cam's ``show_cam_on_image`` overlays.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image

from pytorch_grad_cam_vlm.layers import Layer, layer_name

MODES = ("single", "grid", "multi", "comparative")
PANEL_WIDTH = 256
LABEL_HEIGHT = 22
TITLE_HEIGHT = 40
GRID_COLUMNS = 3
DPI = 100
THIRDS = ("early", "middle", "late")


def overlay(rgb: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """grad-cam's ``show_cam_on_image``: ``rgb`` float ``(H, W, 3)`` in [0, 1] and a map ``(H, W)`` in [0, 1] to an
    RGB uint8 overlay."""
    return show_cam_on_image(np.asarray(rgb, dtype=np.float32), np.asarray(cam, dtype=np.float32), use_rgb=True)


def heatmap(rgb: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map alone in the colours of :func:`overlay` (OpenCV's jet), RGB uint8 ``(H, W, 3)``; ``rgb`` is unused
    and there so that both draw functions take the same arguments."""
    return cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * np.clip(cam, 0, 1)), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def figure_title(method: str, layers: Sequence[Layer], token: str) -> str:
    """``GradCAM · layer 5 · target 'red'`` (or ``layers projector, 0, 3``): what every figure says about itself."""
    where = layer_name(layers[0]) if len(layers) == 1 else "layers " + ", ".join(str(i) for i in layers)
    return f"{method} · {where} · target {token!r}"


def panel_layout(mode: str, n_layers: int) -> Tuple[int, int]:
    """``(rows, columns)`` of panels for ``mode`` with ``n_layers`` maps: single 1x2 (heatmap, overlay), grid
    ``ceil(L/3) x min(L, 3)`` overlays, multi ``L x 2`` (heatmap, overlay per layer), comparative 2x3 (heatmaps
    over overlays of the early, middle and late layer)."""
    if mode == "single":
        return 1, 2
    if mode == "grid":
        columns = min(GRID_COLUMNS, n_layers)
        return math.ceil(n_layers / columns), columns
    if mode == "multi":
        return n_layers, 2
    if mode == "comparative":
        return 2, 3
    raise ValueError(f"Unknown mode {mode!r}: use one of {', '.join(MODES)}.")


def figure_size(rows: int, columns: int, image_height: int, image_width: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of a figure of ``rows x columns`` panels for images of the given size."""
    panel_height = round(PANEL_WIDTH * image_height / image_width)
    return columns * PANEL_WIDTH, TITLE_HEIGHT + rows * (LABEL_HEIGHT + panel_height)


def panel_figure(panels: Sequence[Tuple[np.ndarray, str]], rows: int, columns: int, image_size: Tuple[int, int],
                 title: str):
    """A figure of ``rows x columns`` labelled image panels under a title, :func:`figure_size` pixels large, drawn
    with the Agg canvas (no window). ``panels`` are ``(RGB image, label)`` in reading order."""
    from matplotlib.figure import Figure

    width, height = figure_size(rows, columns, *image_size)
    panel_height = (height - TITLE_HEIGHT) / rows - LABEL_HEIGHT
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    figure.text(0.5, 1 - TITLE_HEIGHT / 2 / height, title, ha="center", va="center", fontsize=11)
    for index, (image, label) in enumerate(panels):
        row, column = divmod(index, columns)
        bottom = height - TITLE_HEIGHT - (row + 1) * (LABEL_HEIGHT + panel_height)
        axes = figure.add_axes((column / columns, bottom / height, 1 / columns, panel_height / height))
        axes.imshow(image, extent=(0, 1, 0, 1), aspect="auto")
        axes.set_axis_off()
        figure.text((column + 0.5) / columns, (bottom + panel_height + LABEL_HEIGHT / 2) / height, label,
                    ha="center", va="center", fontsize=9)
    return figure


def comparative_positions(n_layers: int) -> List[int]:
    """Positions of the early, middle and late layer among ``n_layers`` layers in depth order: the centre of each
    third."""
    if n_layers < 3:
        raise ValueError(f"The comparative mode needs at least 3 layers (early, middle, late), got {n_layers}.")
    return [int(third[len(third) // 2]) for third in np.array_split(np.arange(n_layers), 3)]


def mode_layers(mode: str, layers: Sequence[int]) -> List[int]:
    """The layers a mode draws out of the selected ``layers``: single needs exactly one, comparative the early,
    middle and late one (:func:`comparative_positions`), grid and multi all of them."""
    if mode == "single" and len(layers) != 1:
        raise ValueError(f"The single mode draws one layer, got {len(layers)}: pass one layer or use --mode grid.")
    if mode == "comparative":
        return [layers[i] for i in comparative_positions(len(layers))]
    panel_layout(mode, len(layers))  # refuses unknown modes
    return list(layers)


def save_figure(path: str, mode: str, rgb: np.ndarray, maps: np.ndarray, layers: Sequence[int], method: str,
                token: str, notes: Optional[Sequence[str]] = None) -> str:
    """Draw ``maps`` ``(L, H, W)`` of ``layers`` on ``rgb`` ``(H, W, 3)`` as the figure of ``mode`` and save it as a
    PNG at ``path``. ``maps`` and ``layers`` are those of :func:`mode_layers`; ``notes`` (one per layer, e.g. the
    map's deletion check) end each panel's label. Returns ``path``."""
    notes = [f" · {n}" for n in notes] if notes else [""] * len(layers)
    maps = np.asarray(maps)
    if maps.ndim != 3 or len(maps) != len(layers) or maps.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"Expected maps (L={len(layers)}, H, W) on the image's {rgb.shape[:2]} grid, "
                         f"got {maps.shape}.")
    rows, columns = panel_layout(mode, len(layers))
    if mode == "comparative":
        panels = [(heatmap, m, f"{name} · {layer_name(k)} · heatmap{n}")
                  for name, k, m, n in zip(THIRDS, layers, maps, notes)]
        panels += [(overlay, m, f"{name} · {layer_name(k)} · overlay") for name, k, m in zip(THIRDS, layers, maps)]
    elif mode == "grid":
        panels = [(overlay, m, f"{layer_name(k)}{n}") for k, m, n in zip(layers, maps, notes)]
    else:  # single and multi: heatmap and overlay of each layer, one layer per row
        panels = [(draw, m, f"{layer_name(k)} · {kind}" + (n if kind == "heatmap" else "")) for k, m, n in
                  zip(layers, maps, notes) for draw, kind in ((heatmap, "heatmap"), (overlay, "overlay"))]
    drawn = []
    for draw, cam, label in panels:
        if not cam.max() > 0:
            label += " · blank"  # the method gave this layer no positive evidence: say so, not just a blue panel
        drawn.append((draw(rgb, cam), label))
    figure = panel_figure(drawn, rows, columns, rgb.shape[:2], figure_title(method, layers, token))
    figure.savefig(path, dpi=DPI)
    return path


def save_overlay(path: str, rgb: np.ndarray, cam: np.ndarray) -> str:
    """The overlay alone as a PNG at the image's own size (no title). Returns ``path``."""
    Image.fromarray(overlay(rgb, cam)).save(path)
    return path


def save_maps(path: str, maps: np.ndarray) -> str:
    """The raw maps as float32 ``.npy``. Returns ``path``."""
    np.save(path, np.asarray(maps, dtype=np.float32))
    return path


def render(out_dir: str, stem: str, mode: str, rgb: np.ndarray, maps: np.ndarray, layers: Sequence[int],
           method: str, token: str, notes: Optional[Sequence[str]] = None, title: Optional[str] = None) -> List[str]:
    """Write what ``mode`` shows for one image into ``out_dir``: the mode's figure (titled ``title``, default
    ``method``; panel labels ending in ``notes``), the raw maps (``{stem}_{method}_maps.npy``, ``(L, H, W)`` in the
    order of ``layers``) and, in single mode, the overlay at the image's size. Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, f"{stem}_{method}")
    files = [save_figure(f"{prefix}_{mode}.png", mode, rgb, maps, layers, title or method, token, notes),
             save_maps(f"{prefix}_maps.npy", maps)]
    if mode == "single":
        files.append(save_overlay(f"{prefix}_{layer_name(layers[0]).replace(' ', '')}_overlay.png", rgb, maps[0]))
    return files


# ----------------------------------------------------------------------------------------- the prompt's words
WORDS_FONT_SIZE = 14
WORDS_LINE_HEIGHT = 24


def word_colors(relevance: Sequence[float]) -> List[Tuple[int, int, int]]:
    """A background colour per word: white at 0, red for the largest positive relevance, blue for the most negative
    (scaled by the largest magnitude, so that the sign reads at a glance)."""
    values = np.asarray(relevance, dtype=np.float64)
    scale = np.abs(values).max() if values.size and np.abs(values).max() > 0 else 1.0
    colors = []
    for v in values / scale:
        fade = int(round(255 * (1 - 0.7 * abs(v))))  # at most 70 % colour: black text stays legible
        colors.append((255, fade, fade) if v >= 0 else (fade, fade, 255))
    return colors


def words_strip(words: Sequence[str], relevance: Sequence[float], width: int, label: str = "") -> np.ndarray:
    """The prompt's words as coloured text (:func:`word_colors`), wrapped to ``width`` pixels after ``label``: an RGB
    uint8 image ``(lines x WORDS_LINE_HEIGHT, width, 3)``."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=WORDS_FONT_SIZE)
    items = ([(label, (255, 255, 255))] if label else []) + list(zip(words, word_colors(relevance)))
    placed, x, line = [], 4, 0
    for text, color in items:
        box_width = int(font.getlength(text)) + 8
        if x + box_width > width - 4 and x > 4:
            x, line = 4, line + 1
        placed.append((x, line, text, color))
        x += box_width + 4
    image = Image.new("RGB", (width, (line + 1) * WORDS_LINE_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    for x, line, text, color in placed:
        top = line * WORDS_LINE_HEIGHT + 2
        draw.rectangle((x, top, x + int(font.getlength(text)) + 8, top + WORDS_LINE_HEIGHT - 4), fill=color)
        draw.text((x + 4, top + 2), text, fill="black", font=font)
    return np.asarray(image)


def append_words(path: str, words: Sequence[str], relevance: Sequence[float], label: str = "") -> str:
    """Put :func:`words_strip` under the figure saved at ``path`` (rewritten in place). Returns ``path``."""
    with Image.open(path) as opened:
        figure = np.asarray(opened.convert("RGB"))
    strip = words_strip(words, relevance, figure.shape[1], label)
    Image.fromarray(np.concatenate([figure, strip])).save(path)
    return path
