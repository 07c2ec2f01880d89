"""What the explorer's page shows of a result of :func:`~pytorch_grad_cam_vlm.cli.explorer.explain_request`: the
summary, the JSON details, the heatmap figure with its colour bar, the layer strip and a token's map; plain
functions of the result dict."""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

from pytorch_grad_cam_vlm.cli.common import json_safe
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.layers import layer_name
from pytorch_grad_cam_vlm.visualize import heatmap, overlay


def token_map(result: dict, index: Optional[int]) -> np.ndarray:
    """The map a token chip shows: token ``index``'s, or the whole answer's for ``None``."""
    if index is None:
        return result["map"]
    if result["token_maps"] is None or not 0 <= index < len(result["token_maps"]):
        raise InputError("Explain the generated answer first, then pick one of its tokens.")
    return result["token_maps"][index]


def summary(result: dict) -> str:
    """The page's summary of a result, in Markdown: the prediction, the method and layer, the check and warning."""
    said = (f"**Answer** `{result['predicted_token']}`" if result["tokens"]
            else f"**Predicted** `{result['predicted_token']}`")
    if result["probability"] is not None:
        said += f" · probability **{result['probability']:.3f}**"
    method = (f"{result['method_spec']} → {result['method']}" if result["method_spec"].lower() == "auto"
              else result["method"])
    margin = result.get("null_margin")
    chance = "" if margin is None or np.isnan(margin) else f", {margin:.2g} spreads above chance"
    check = "blank" if np.isnan(result["check"]) else f"{result['check']:+.3g} ({result['verdict']}{chance})"
    lines = [said, f"**Map** {method} · {layer_name(result['layer'], result['target'])} · deletion check **{check}**"]
    if "answer_change" in result:
        lines.append(answer_change_line(result["answer_change"]))
    if result["warning"]:
        lines.append(f"⚠️ {result['warning']}")
    if result.get("prompt_words"):
        lines.append(prompt_words_html(result))
    return "\n\n".join(lines)


def answer_change_line(share: Optional[float]) -> str:
    """The smallest region that changes the answer (:mod:`~pytorch_grad_cam_vlm.metrics.answer_change`), in words."""
    if share is None:
        return "**Answer change** none: the top answer holds with every pixel removed in the map's order"
    return f"**Answer change** the top answer changes once the map's top **{share:.0%}** of the pixels are removed"


def prompt_words_html(result: dict) -> str:
    """The prompt's words coloured by the relevance that agrees better with deleting them, each with its value."""
    import html

    from pytorch_grad_cam_vlm.methods.prompt_words import AGREES_BETTER
    from pytorch_grad_cam_vlm.visualize import word_colors

    values = result[f"word_{AGREES_BETTER}"]
    spans = [f'<span style="background-color:rgb{color}">{html.escape(word)} {value:+.2g}</span>'
             for word, value, color in zip(result["prompt_words"], values, word_colors(values))]
    return f"**Prompt words** ({AGREES_BETTER.replace('_', ' ')}) " + " ".join(spans)


def details(result: dict) -> dict:
    """The JSON-safe part of a result (what the page's API returns besides images and files)."""
    return dict(predicted_token=result["predicted_token"], probability=result["probability"],
                method=result["method"], layer=result["layer"], target=result["target"],
                check=None if np.isnan(result["check"]) else float(result["check"]),
                verdict=result["verdict"], null_margin=json_safe(result.get("null_margin")),
                warning=result["warning"], candidates=result["candidates"],
                strip_layers=[int(k) for k in result["strip_layers"]], strip_checks=result["strip_checks"],
                tokens=result["tokens"], token_probabilities=result["token_probabilities"],
                **{k: result[k] for k in ("prompt_words", "word_occlusion", "word_gradient_x_input", "answer_change")
                   if k in result},
                files=[os.path.basename(f) for f in result.get("files", [])])


def heatmap_figure(cam: np.ndarray, title: str, rgb: np.ndarray):
    """The raw map with a colour bar, as :func:`~pytorch_grad_cam_vlm.visualize.heatmap` draws it (OpenCV's jet on
    [0, 1]; pixels the model never saw, NaN, show ``rgb`` greyed and hatched), as a matplotlib ``Figure`` (Agg
    canvas, no window)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    colours = ListedColormap(heatmap(None, np.linspace(0, 1, 256)[None])[0] / 255.0, name="opencv_jet")
    figure = Figure(figsize=(4.2, 3.6), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(heatmap(rgb, cam))
    axes.set_axis_off()
    blank = not np.nanmax(cam, initial=0) > 0
    axes.set_title(title + (" · blank" if blank else ""), fontsize=9)
    figure.colorbar(ScalarMappable(Normalize(0, 1), colours), ax=axes, fraction=0.046, pad=0.04, label="relevance")
    figure.tight_layout()
    return figure


def strip_items(result: dict) -> List[tuple]:
    """The layer strip as ``(overlay, caption)`` pairs, one per layer."""
    return [(overlay(result["rgb"], cam), f"layer {k}" + ("" if c is None else f" {c:+.2g}"))
            for k, cam, c in zip(result["strip_layers"], result["strip_maps"], result["strip_checks"])]
