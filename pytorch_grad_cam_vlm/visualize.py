"""The visual modes of Smooth Grad-CAM for Qwen2.5-VL as PNG figures: one layer (heatmap and overlay), a grid of
layers, a multi-layer figure (heatmap and overlay per layer) and an early/middle/late comparison; raw maps as .npy; a
video's frames under their maps in a strip, and as an animated GIF.

Figures have an exact pixel size: panels of :data:`PANEL_WIDTH` pixels (height by the image's aspect ratio), each
under a label strip of :data:`LABEL_HEIGHT` pixels (two lines), below a title strip of :data:`TITLE_HEIGHT` pixels
(two lines), above a strip of :data:`COLORBAR_HEIGHT` pixels with the colour bar and what the labels' numbers mean.
Heatmaps use OpenCV's jet colormap on the fixed range [0, 1], the colours of grad-cam's ``show_cam_on_image``
overlays. Maps lie on the user's image; where the model saw no part of it (NaN, outside a center crop) panels show
the image greyed under diagonal hatching (:func:`unseen`).
"""
from __future__ import annotations

import math
import os
import textwrap
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image

from pytorch_grad_cam_vlm.layers import Layer, layer_name

MODES = ("single", "grid", "multi", "comparative")
PANEL_WIDTH = 256
LABEL_HEIGHT = 34  # two lines of 8-point text
TITLE_HEIGHT = 48  # two lines of 10-point text
COLORBAR_HEIGHT = 72  # the colour bar, its ticks and three lines of legend
LABEL_POINTS, TITLE_POINTS = 8, 10
GRID_COLUMNS = 3
DPI = 100
THIRDS = ("early", "middle", "late")


def overlay(rgb: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """grad-cam's ``show_cam_on_image``: ``rgb`` float ``(H, W, 3)`` in [0, 1] and a map ``(H, W)`` in [0, 1] to an
    RGB uint8 overlay; NaN pixels of the map (not seen by the model) show :func:`unseen`."""
    cam = np.asarray(cam, dtype=np.float32)
    drawn = show_cam_on_image(np.asarray(rgb, dtype=np.float32), np.nan_to_num(cam), use_rgb=True)
    return unseen(drawn, rgb, np.isnan(cam))


def heatmap(rgb: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map alone in the colours of :func:`overlay` (OpenCV's jet), RGB uint8 ``(H, W, 3)``; ``rgb`` shows only
    where the map is NaN (:func:`unseen`)."""
    cam = np.asarray(cam, dtype=np.float32)
    drawn = cv2.applyColorMap(np.uint8(255 * np.clip(np.nan_to_num(cam), 0, 1)), cv2.COLORMAP_JET)
    return unseen(cv2.cvtColor(drawn, cv2.COLOR_BGR2RGB), rgb, np.isnan(cam))


def unseen(drawn: np.ndarray, rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``drawn`` with the pixels of ``mask`` (the model saw no part of the image there) replaced by the image
    ``rgb`` greyed, lightened and hatched with diagonal lines: visibly no evidence either way."""
    if not mask.any():
        return drawn
    grey = np.asarray(rgb, dtype=np.float32).mean(-1, keepdims=True)
    shaded = np.repeat(0.55 + 0.35 * grey, 3, -1)
    period = max(6, min(mask.shape) // 24)
    ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    shaded[(ys + xs) % period < max(1, period // 4)] = 0.35  # the hatching
    out = drawn.copy()
    out[mask] = np.uint8(255 * shaded[mask])
    return out


def figure_title(method: str, layers: Sequence[Layer], token: str) -> str:
    """``GradCAM · layer 5 · target 'red'`` (or ``layers projector, 0, 3``): what every figure says about itself."""
    where = layer_name(layers[0]) if len(layers) == 1 else "layers " + ", ".join(str(i) for i in layers)
    return f"{method} · {where} · target {token!r}"


def panel_layout(mode: str, n_layers: int) -> Tuple[int, int]:
    """``(rows, columns)`` of panels for ``mode`` with ``n_layers`` maps: single 1x2 (heatmap, overlay), grid
    ``ceil(L/3) x min(L, 3)`` overlays, multi ``L x 2`` (heatmap, overlay per layer), comparative ``2 x L`` (heatmaps
    over overlays of the early, middle and late layer, and the chosen one when it is none of them)."""
    if mode == "single":
        return 1, 2
    if mode == "grid":
        columns = min(GRID_COLUMNS, n_layers)
        return math.ceil(n_layers / columns), columns
    if mode == "multi":
        return n_layers, 2
    if mode == "comparative":
        return 2, n_layers
    raise ValueError(f"Unknown mode {mode!r}: use one of {', '.join(MODES)}.")


def figure_size(rows: int, columns: int, image_height: int, image_width: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of a figure of ``rows x columns`` panels for images of the given size."""
    panel_height = round(PANEL_WIDTH * image_height / image_width)
    return columns * PANEL_WIDTH, TITLE_HEIGHT + rows * (LABEL_HEIGHT + panel_height) + COLORBAR_HEIGHT


def fit_text(text: str, width_px: float, points: float, lines: int = 2) -> str:
    """``text`` wrapped to lines that fit ``width_px`` pixels at ``points`` (at :data:`DPI`; a character of
    matplotlib's default font is about 0.5 em wide in these labels, measured; 0.56 leaves a margin), at most
    ``lines`` of them, the last cut with an ellipsis when it does not fit."""
    chars = max(8, int(width_px / (0.56 * points * DPI / 72)))
    wrapped = textwrap.wrap(text, chars, break_long_words=True) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:chars - 1].rstrip() + "…"
    return "\n".join(wrapped)


def panel_figure(panels: Sequence[Tuple[np.ndarray, str]], rows: int, columns: int, image_size: Tuple[int, int],
                 title: str, legend: str = "", unseen_shown: bool = False):
    """A figure of ``rows x columns`` labelled image panels under a title and above a colour bar of the maps'
    range [0, 1] (with a hatched swatch when ``unseen_shown``: parts of the image the model did not see) and a
    ``legend`` line, :func:`figure_size` pixels large, drawn with the Agg canvas (no window). ``panels`` are ``(RGB
    image, label)`` in reading order; labels and title wrap to two lines, never running into each other."""
    from matplotlib.figure import Figure

    width, height = figure_size(rows, columns, *image_size)
    panel_height = (height - TITLE_HEIGHT - COLORBAR_HEIGHT) / rows - LABEL_HEIGHT
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    figure.text(0.5, 1 - TITLE_HEIGHT / 2 / height, fit_text(title, width - 8, TITLE_POINTS), ha="center",
                va="center", fontsize=TITLE_POINTS, linespacing=1.2)
    for index, (image, label) in enumerate(panels):
        row, column = divmod(index, columns)
        bottom = height - TITLE_HEIGHT - (row + 1) * (LABEL_HEIGHT + panel_height)
        axes = figure.add_axes((column / columns, bottom / height, 1 / columns, panel_height / height))
        axes.imshow(image, extent=(0, 1, 0, 1), aspect="auto")
        axes.set_axis_off()
        figure.text((column + 0.5) / columns, (bottom + panel_height + LABEL_HEIGHT / 2) / height,
                    fit_text(label, PANEL_WIDTH - 6, LABEL_POINTS), ha="center", va="center",
                    fontsize=LABEL_POINTS, linespacing=1.15)
    _colour_bar(figure, width, height, legend, unseen_shown)
    return figure


def _colour_bar(figure, width: int, height: int, legend: str, unseen_shown: bool) -> None:
    """The strip under the panels: jet from 0 to 1 with its ticks, a hatched swatch for the unseen parts, and the
    legend."""
    bar_width = min(width - 24, 300) - (70 if unseen_shown else 0)
    left = (width - bar_width - (70 if unseen_shown else 0)) / 2
    bar = figure.add_axes((left / width, (COLORBAR_HEIGHT - 14) / height, bar_width / width, 10 / height))
    bar.imshow(heatmap(None, np.linspace(0, 1, 256)[None]), extent=(0, 1, 0, 1), aspect="auto")
    bar.set_yticks([])
    bar.set_xticks([0, 0.5, 1])
    bar.set_xticklabels(["0 low", "0.5", "1 high"], fontsize=7)
    bar.tick_params(length=2, pad=1)
    if unseen_shown:
        swatch = figure.add_axes(((left + bar_width + 10) / width, (COLORBAR_HEIGHT - 14) / height, 14 / width,
                                  10 / height))
        swatch.imshow(unseen(np.zeros((20, 28, 3), np.uint8), np.full((20, 28, 3), 0.5), np.ones((20, 28), bool)),
                      extent=(0, 1, 0, 1), aspect="auto")
        swatch.set_axis_off()
        figure.text((left + bar_width + 28) / width, (COLORBAR_HEIGHT - 9) / height, "not seen", fontsize=7,
                    va="center")
    if legend:
        figure.text(0.5, 20 / height, fit_text(legend, width - 8, 7, 3), ha="center", va="center", fontsize=7,
                    linespacing=1.15)


def comparative_positions(n_layers: int) -> List[int]:
    """Positions of the early, middle and late layer among ``n_layers`` layers in depth order: the centre of each
    third."""
    if n_layers < 3:
        raise ValueError(f"The comparative mode needs at least 3 layers (early, middle, late), got {n_layers}.")
    return [int(third[len(third) // 2]) for third in np.array_split(np.arange(n_layers), 3)]


def mode_layers(mode: str, layers: Sequence[Layer], chosen: Optional[Layer] = None) -> List[Layer]:
    """The layers a mode draws out of the selected ``layers``: single needs exactly one, comparative the early,
    middle and late one (:func:`comparative_positions`), grid and multi all of them; every mode adds ``chosen`` (the
    layer ``auto`` chose) where it is missing, in its place by depth."""
    if mode == "single" and len(layers) != 1:
        raise ValueError(f"The single mode draws one layer, got {len(layers)}: pass one layer or use --mode grid.")
    if mode == "comparative":
        drawn = [layers[i] for i in comparative_positions(len(layers))]
    else:
        panel_layout(mode, len(layers))  # refuses unknown modes
        drawn = list(layers)
    if chosen is not None and chosen not in drawn:
        order = list(layers) if chosen in layers else drawn + [chosen]
        drawn = sorted(drawn + [chosen], key=order.index)
    return drawn


def save_figure(path: str, mode: str, rgb: np.ndarray, maps: np.ndarray, layers: Sequence[Layer], method: str,
                token: str, notes: Optional[Sequence[str]] = None, chosen: Optional[Layer] = None,
                legend: str = "") -> str:
    """Draw ``maps`` ``(L, H, W)`` of ``layers`` on ``rgb`` ``(H, W, 3)`` as the figure of ``mode`` and save it as a
    PNG at ``path``. ``maps`` and ``layers`` are those of :func:`mode_layers`; ``notes`` (one per layer, e.g. the
    map's deletion check) end each panel's label, ``chosen`` marks the layer ``auto`` chose, ``legend`` goes under
    the colour bar. Returns ``path``."""
    notes = [f" · {n}" for n in notes] if notes else [""] * len(layers)
    maps = np.asarray(maps)
    if maps.ndim != 3 or len(maps) != len(layers) or maps.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"Expected maps (L={len(layers)}, H, W) on the image's {rgb.shape[:2]} grid, "
                         f"got {maps.shape}.")
    rows, columns = panel_layout(mode, len(layers))
    names = [layer_name(k) + (" (chosen)" if k == chosen and len(layers) > 1 else "") for k in layers]
    if mode == "comparative":
        thirds = [layers[i] for i in comparative_positions(len(layers))] if chosen in layers and len(layers) > 3 \
            else list(layers)
        kinds = [THIRDS[thirds.index(k)] if k in thirds and len(thirds) == 3 else "chosen" for k in layers]
        panels = [(heatmap, m, f"{kind}: {name} · heatmap{n}") for kind, name, m, n in zip(kinds, names, maps, notes)]
        panels += [(overlay, m, f"{kind}: {name} · overlay") for kind, name, m in zip(kinds, names, maps)]
    elif mode == "grid":
        panels = [(overlay, m, f"{name}{n}") for name, m, n in zip(names, maps, notes)]
    else:  # single and multi: heatmap and overlay of each layer, one layer per row
        panels = [(draw, m, f"{name} · {kind}" + (n if kind == "heatmap" else "")) for name, m, n in
                  zip(names, maps, notes) for draw, kind in ((heatmap, "heatmap"), (overlay, "overlay"))]
    drawn = []
    for draw, cam, label in panels:
        if not np.nanmax(cam, initial=0) > 0:
            label += " · blank"  # the method gave this layer no positive evidence: say so, not just a blue panel
        drawn.append((draw(rgb, cam), label))
    figure = panel_figure(drawn, rows, columns, rgb.shape[:2], figure_title(method, layers, token), legend,
                          bool(np.isnan(maps).any()))
    figure.savefig(path, dpi=DPI)
    return path


def save_overlay(path: str, rgb: np.ndarray, cam: np.ndarray, label: str = "") -> str:
    """The overlay on the image, at the image's own size (to lay over the photo as it is), ``label`` in the PNG's
    ``Title`` text (what image viewers show as its title). Returns ``path``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if label:
        info.add_itxt("Title", label)
    Image.fromarray(overlay(rgb, cam)).save(path, pnginfo=info)
    return path


def save_maps(path: str, maps: np.ndarray) -> str:
    """The raw maps as float32 ``.npy``. Returns ``path``."""
    np.save(path, np.asarray(maps, dtype=np.float32))
    return path


def render(out_dir: str, stem: str, mode: str, rgb: np.ndarray, maps: np.ndarray, layers: Sequence[Layer],
           method: str, token: str, notes: Optional[Sequence[str]] = None, title: Optional[str] = None,
           chosen: Optional[Layer] = None, legend: str = "") -> List[str]:
    """Write what ``mode`` shows for one image into ``out_dir``: the mode's figure (titled ``title``, default
    ``method``; panel labels ending in ``notes``, ``chosen`` marked, ``legend`` under the colour bar), the raw maps
    (``{stem}_{method}_maps.npy``, ``(L, H, W)`` in the order of ``layers``, NaN where the model saw nothing) and the
    overlay of the chosen layer (single mode: the one layer) at the image's size, labelled. ``rgb`` and ``maps`` are
    on the user's image. Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, f"{stem}_{method}")
    files = [save_figure(f"{prefix}_{mode}.png", mode, rgb, maps, layers, title or method, token, notes, chosen,
                         legend),
             save_maps(f"{prefix}_maps.npy", maps)]
    k = layers.index(chosen) if chosen in layers else 0
    label = f"{title or method} · {layer_name(layers[k])} · target {token!r}" + (f" · {notes[k]}" if notes else "")
    files.append(save_overlay(f"{prefix}_{layer_name(layers[k]).replace(' ', '')}_overlay.png", rgb, maps[k], label))
    return files


# ----------------------------------------------------------------------------------------- videos
STRIP_COLUMNS = 8  # frames per row of a video's strip figure


def save_video_strip(path: str, frames: np.ndarray, maps: np.ndarray, labels: Sequence[str], title: str,
                     legend: str = "") -> str:
    """A video's frames ``(T, H, W, 3)`` float in [0, 1], each with its map ``(T, H, W)`` overlaid, in a row
    (:data:`STRIP_COLUMNS` per row) under ``labels``, the title above and the colour bar below, as a PNG at
    ``path``. Returns ``path``."""
    frames, maps = np.asarray(frames), np.asarray(maps)
    if maps.shape != frames.shape[:3] or len(labels) != len(frames):
        raise ValueError(f"Expected one map (T, H, W) and one label per frame of {frames.shape[:3]}, got maps "
                         f"{maps.shape} and {len(labels)} labels.")
    columns = min(STRIP_COLUMNS, len(frames))
    panels = [(overlay(frame, cam), label + ("" if np.nanmax(cam, initial=0) > 0 else " · blank"))
              for frame, cam, label in zip(frames, maps, labels)]
    figure = panel_figure(panels, math.ceil(len(frames) / columns), columns, frames.shape[1:3], title, legend,
                          bool(np.isnan(maps).any()))
    figure.savefig(path, dpi=DPI)
    return path


def save_video_gif(path: str, frames: np.ndarray, maps: np.ndarray, fps: float, max_side: int = 512) -> str:
    """The overlays of a video's frames ``(T, H, W, 3)`` float in [0, 1] and maps ``(T, H, W)`` as an animated GIF
    (Pillow) at ``fps`` frames per second, looping, scaled down to ``max_side`` pixels on the longer side. Returns
    ``path``."""
    drawn = [Image.fromarray(overlay(frame, cam)) for frame, cam in zip(frames, maps)]
    scale = min(1.0, max_side / max(drawn[0].size))
    if scale < 1:
        size = (max(1, round(drawn[0].width * scale)), max(1, round(drawn[0].height * scale)))
        drawn = [image.resize(size, Image.BILINEAR) for image in drawn]
    drawn[0].save(path, save_all=True, append_images=drawn[1:], duration=max(20, round(1000 / fps)), loop=0)
    return path


# ----------------------------------------------------------------------------------------- several images
def save_images_figure(path: str, rgbs: Sequence[np.ndarray], maps: Sequence[np.ndarray], labels: Sequence[str],
                       title: str, legend: str = "") -> str:
    """The images of one prompt side by side, each ``rgbs[i]`` ``(H_i, W_i, 3)`` in [0, 1] with its part of the map
    ``maps[i]`` ``(H_i, W_i)`` overlaid, under ``labels[i]`` (its share of the map, its check), the title above and
    the colour bar below, as a PNG at ``path``. Images less tall for their width than the tallest are padded with
    white below, so that none is stretched. Returns ``path``."""
    if not len(rgbs) == len(maps) == len(labels) or any(np.shape(m) != r.shape[:2] for r, m in zip(rgbs, maps)):
        raise ValueError(f"Expected one map of each image's size and one label per image, got images "
                         f"{[r.shape[:2] for r in rgbs]}, maps {[np.shape(m) for m in maps]} and {len(labels)} labels.")
    ratio = max(rgb.shape[0] / rgb.shape[1] for rgb in rgbs)
    panels = []
    for rgb, cam, label in zip(rgbs, maps, labels):
        padded = np.full((max(rgb.shape[0], round(ratio * rgb.shape[1])), rgb.shape[1], 3), 255, np.uint8)
        padded[:rgb.shape[0]] = overlay(rgb, cam)
        panels.append((padded, label + ("" if np.nanmax(cam, initial=0) > 0 else " · blank")))
    figure = panel_figure(panels, 1, len(panels), (round(ratio * PANEL_WIDTH), PANEL_WIDTH), title, legend,
                          any(bool(np.isnan(m).any()) for m in maps))
    figure.savefig(path, dpi=DPI)
    return path


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
