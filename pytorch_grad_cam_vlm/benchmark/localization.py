"""The localization table: pointing game, distractor hits and energy in the evidence box of every method and decoder
layer on samples whose evidence is known (the demo tasks), against occlusion."""
from __future__ import annotations

import csv
import os
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from pytorch_grad_cam_vlm.metrics.localization import energy_in_box, occlusion_map, pointing_hit
from pytorch_grad_cam_vlm.models.qwen_vl import QwenVLWrapper


# A map maker: (wrapper for the sample's prompt, decoder layer index or None, image (1,3,H,W), answer token id) -> (H,W)
MapMaker = Callable[[QwenVLWrapper, Optional[int], torch.Tensor, int], np.ndarray]


def grad_cam_method(cam_class, target_layer: Optional[Callable[[QwenVLWrapper], torch.nn.Module]] = None
                    ) -> MapMaker:
    """A map maker for a grad-cam method class explaining the answer token's logit: on the table's decoder layer,
    or on ``target_layer(wrapper)`` (a vision block, the merger) for a row without a decoder layer."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def make(wrapper: QwenVLWrapper, layer: Optional[int], x: torch.Tensor, target_token_id: int) -> np.ndarray:
        chosen = wrapper.decoder_layers[layer] if target_layer is None else target_layer(wrapper)
        with cam_class(model=wrapper, target_layers=[chosen], reshape_transform=wrapper.reshape_transform) as cam:
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(target_token_id)])[0]
    return make


def occlusion_method(window: int = 28) -> MapMaker:
    """Occlusion as a map maker (it has no layer)."""
    def make(wrapper: QwenVLWrapper, layer: Optional[int], x: torch.Tensor, target_token_id: int) -> np.ndarray:
        return occlusion_map(wrapper, x, target_token_id, window=window)
    return make


def auto_method(**options) -> MapMaker:
    """:func:`pytorch_grad_cam_vlm.methods.auto.explain` as a map maker: the best-scoring map of its candidate
    methods and layers (it has no single layer); ``options`` go to ``explain``."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pytorch_grad_cam_vlm.methods.auto import explain

    def make(wrapper: QwenVLWrapper, layer: Optional[int], x: torch.Tensor, target_token_id: int) -> np.ndarray:
        return explain(wrapper, x, [ClassifierOutputTarget(target_token_id)], **options).maps[0]
    return make


def default_methods(smooth_grad_samples: int = 8) -> Dict[str, Tuple[MapMaker, bool]]:
    """The methods of the table: name -> (map maker, whether it runs per decoder layer). SmoothGradCAM averages
    ``smooth_grad_samples`` noisy copies (noise 0.15 of the input's range, fixed seed); "Attention" is the raw
    attention of the last prompt token to the image tokens, heads averaged."""
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM

    from pytorch_grad_cam_vlm.methods.attention import AttentionMap
    from pytorch_grad_cam_vlm.methods.smooth_grad import SmoothGradCAM

    methods: Dict[str, Tuple[MapMaker, bool]] = {"Occlusion": (occlusion_method(), False),
                                                 "auto": (auto_method(), False)}
    for cls in (GradCAM, HiResCAM, GradCAMPlusPlus, LayerCAM, EigenCAM):
        methods[cls.__name__] = (grad_cam_method(cls), True)
    methods["SmoothGradCAM"] = (grad_cam_method(partial(SmoothGradCAM, n_samples=smooth_grad_samples, seed=0)), True)
    methods["Attention"] = (grad_cam_method(AttentionMap), True)
    for cls in (GradCAM, GradCAMPlusPlus):  # vision-encoder rows: the window order is undone by the reshape
        methods[f"{cls.__name__} (last vision block)"] = (grad_cam_method(cls, lambda w: w.vision_blocks[-1]), False)
        methods[f"{cls.__name__} (merger)"] = (grad_cam_method(cls, lambda w: w.merger), False)
    return methods


def localization_table(wrapper: QwenVLWrapper, samples: Sequence, methods: Optional[Dict[str, Tuple[MapMaker, bool]]]
                       = None, layers: Optional[Sequence[int]] = None, tolerance_px: Optional[float] = None,
                       progress: bool = False) -> List[dict]:
    """Pointing game, distractor hits, energy in the evidence box and seconds per map, for every method and (for
    layered methods) every decoder layer in ``layers`` (default: all but the last).

    ``samples`` are :class:`pytorch_grad_cam_vlm.demo.DemoSample`; each is asked with its own prompt on the model
    and processor of ``wrapper``. The tolerance defaults to half a token cell (14 px for Qwen). Returns one dict per
    (method, layer): ``method, layer, n, pointing, distractor, energy, seconds_per_map``."""
    methods = default_methods() if methods is None else methods
    n_layers = len(wrapper.decoder_layers)
    layers = list(range(n_layers - 1)) if layers is None else list(layers)
    if tolerance_px is None:
        tolerance_px = wrapper.token_cell / 2
    wrappers: Dict[str, QwenVLWrapper] = {}
    tokenizer = wrapper.processor.tokenizer
    prepared = []
    for sample in samples:
        if sample.prompt not in wrappers:
            wrappers[sample.prompt] = QwenVLWrapper(wrapper.model, wrapper.processor, sample.prompt,
                                                    wrapper.efficient_gradients)
        answer_id = tokenizer.convert_tokens_to_ids(sample.answer)
        prepared.append((wrappers[sample.prompt], wrappers[sample.prompt].preprocess(sample.image), answer_id, sample))
    rows = []
    units = [(name, make, layer) for name, (make, layered) in methods.items()
             for layer in (layers if layered else [None])]
    for name, make, layer in tqdm(units, desc="localization table", unit="row", disable=not progress):
        hits, distractor_hits, energy, seconds = 0, 0, 0.0, 0.0
        for sample_wrapper, x, answer_id, sample in prepared:
            start = time.perf_counter()
            cam = make(sample_wrapper, layer, x, answer_id)
            seconds += time.perf_counter() - start
            hits += pointing_hit(cam, sample.evidence_box, tolerance_px)
            distractor_hits += any(pointing_hit(cam, box, tolerance_px) for box in sample.distractor_boxes)
            energy += energy_in_box(cam, sample.evidence_box)
        n = len(prepared)
        rows.append(dict(method=name, layer=layer, n=n, pointing=hits / n, distractor=distractor_hits / n,
                         energy=energy / n, seconds_per_map=seconds / n))
    return rows


def answer_accuracy(wrapper: QwenVLWrapper, samples: Sequence) -> float:
    """Share of ``samples`` whose answer is the model's next token (argmax)."""
    wrappers: Dict[str, QwenVLWrapper] = {}
    correct = 0
    with torch.no_grad():
        for sample in samples:
            w = wrappers.setdefault(sample.prompt, type(wrapper)(wrapper.model, wrapper.processor, sample.prompt))
            predicted = int(w(w.preprocess(sample.image)).argmax(-1))
            correct += predicted == wrapper.processor.tokenizer.convert_tokens_to_ids(sample.answer)
    return correct / len(samples)


def best_gradient_row(rows: Sequence[dict]) -> dict:
    """The gradient method and layer with the best pointing accuracy (ties: fewer distractor hits, then cost)."""
    gradient = [r for r in rows if r["layer"] is not None and r["method"] not in ("EigenCAM", "Attention")]
    return max(gradient, key=lambda r: (r["pointing"], -r["distractor"], -r["seconds_per_map"]))


def format_row(row: dict) -> str:
    layer = "-" if row["layer"] is None else str(row["layer"])
    return (f"| {row['method']} | {layer} | {row['pointing']:.3f} | {row['distractor']:.3f} | {row['energy']:.3f} "
            f"| {row['seconds_per_map'] * 1000:.1f} |")


def table_markdown(rows: Sequence[dict]) -> str:
    """The table as markdown: pointing game on the evidence and on the distractors, energy in the evidence box,
    milliseconds per map."""
    lines = ["| method | layer | pointing (evidence) | pointing (distractor) | energy in evidence box | ms per map |",
             "|---|---|---|---|---|---|"]
    return "\n".join(lines + [format_row(r) for r in rows])


def write_table(rows: Sequence[dict], out_dir: str, header: str = "") -> Tuple[str, str]:
    """Save ``localization_table.md`` and ``localization_table.csv`` in ``out_dir``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, "localization_table.md")
    csv_path = os.path.join(out_dir, "localization_table.csv")
    with open(md_path, "w") as f:
        f.write(header + table_markdown(rows) + "\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return md_path, csv_path


