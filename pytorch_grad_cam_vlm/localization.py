"""Do the maps point at the evidence? The causal reference (occlusion), the pointing game, the energy inside a box,
and the localization table over methods and decoder layers on the demo task.

    python -m pytorch_grad_cam_vlm.localization --n 200 --out benchmarks/
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.qwen_vl import QwenVLWrapper

Box = Tuple[int, int, int, int]
# A map maker: (wrapper for the sample's prompt, decoder layer index or None, image (1,3,H,W), answer token id) -> (H,W)
MapMaker = Callable[[QwenVLWrapper, Optional[int], torch.Tensor, int], np.ndarray]

# Relative depth of the layer that `auto_layer` picks: GradCAM's best pointing layer on the demo model, decoder layer 0
# of layers 0..3 (40 held-out samples: pointing 0.700 / distractor 0.175 at layer 0, 0.675 / 0.250 at layer 1,
# 0.275 / 0.475 at layer 2).
AUTO_LAYER_DEPTH = 0.0


def auto_layer(wrapper: QwenVLWrapper) -> int:
    """The decoder layer that ``auto`` selects: the layer at relative depth :data:`AUTO_LAYER_DEPTH` (the demo
    model's measured best layer), never the last one, whose outputs at image positions get no gradient."""
    n = len(wrapper.decoder_layers)
    if n < 2:
        raise ValueError("The model has a single decoder layer, whose image positions get no gradient: use a vision "
                         "block (wrapper.vision_blocks[-1]) or the merger as target layer.")
    return min(n - 2, int(round(AUTO_LAYER_DEPTH * (n - 1))))


# ------------------------------------------------------------------------------------------------ reference
def occlusion_map(wrapper: QwenVLWrapper, x: torch.Tensor, target_token_id: int, window: int = 28,
                  stride: Optional[int] = None, batch_size: int = 64) -> np.ndarray:
    """The causal reference: grey out ``window``-pixel squares (every ``stride`` pixels, half a window by default)
    and record how much the logit of ``target_token_id`` drops; each pixel gets the mean drop of the windows that
    cover it. ``x`` is one normalised image ``(1, 3, H, W)``; grey is the processor's mean colour (0 once
    normalised). Returns an ``(H, W)`` float32 map, positive where hiding the pixels lowers the answer's score."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"occlusion_map takes one image (1, 3, H, W), got shape {tuple(x.shape)}.")
    stride = stride or max(1, window // 2)
    _, _, height, width = x.shape
    if window > min(height, width):
        raise ValueError(f"The occlusion window ({window} px) is larger than the image ({height}x{width}).")
    tops = _window_starts(height, window, stride)
    lefts = _window_starts(width, window, stride)
    corners = [(t, l) for t in tops for l in lefts]
    with torch.no_grad():
        base = wrapper(x)[0, target_token_id].item()
        scores = []
        for start in range(0, len(corners), batch_size):
            chunk = corners[start:start + batch_size]
            occluded = x.repeat(len(chunk), 1, 1, 1)
            for i, (t, l) in enumerate(chunk):
                occluded[i, :, t:t + window, l:l + window] = 0
            scores.append(wrapper(occluded)[:, target_token_id].cpu())
    drops = base - torch.cat(scores).numpy()
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.float64)
    for (t, l), drop in zip(corners, drops):
        total[t:t + window, l:l + window] += drop
        count[t:t + window, l:l + window] += 1
    return (total / count).astype(np.float32)


def _window_starts(size: int, window: int, stride: int) -> List[int]:
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:  # cover the last pixels too
        starts.append(size - window)
    return starts


# ------------------------------------------------------------------------------------------------ scores
def map_peak(cam: np.ndarray) -> Optional[Tuple[float, float]]:
    """``(x, y)`` of the map's maximum, or ``None`` for a flat (blank) map. A maximum spread over a plateau (as
    occlusion and upsampled token maps make) counts at the plateau pixel nearest to the plateau's centre."""
    cam = np.asarray(cam, dtype=np.float64)
    top, bottom = cam.max(), cam.min()
    if not np.isfinite(top) or top - bottom <= 1e-12 * max(1.0, abs(top)):
        return None
    ys, xs = np.nonzero(cam >= top - 1e-6 * (top - bottom))
    nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return float(xs[nearest]), float(ys[nearest])


def pointing_hit(cam: np.ndarray, box: Box, tolerance_px: float = 14) -> bool:
    """Pointing game: whether the map's maximum lies in ``box`` ``(x0, y0, x1, y1)`` (pixels, ``x1``/``y1``
    exclusive) widened by ``tolerance_px`` on every side. A blank map points nowhere."""
    peak = map_peak(cam)
    if peak is None:
        return False
    x, y = peak
    x0, y0, x1, y1 = box
    return x0 - tolerance_px <= x < x1 + tolerance_px and y0 - tolerance_px <= y < y1 + tolerance_px


def energy_in_box(cam: np.ndarray, box: Box) -> float:
    """The share of the map's positive mass inside ``box`` (0 for a map with no positive mass)."""
    positive = np.clip(np.asarray(cam, dtype=np.float64), 0, None)
    total = positive.sum()
    if total <= 0:
        return 0.0
    x0, y0, x1, y1 = box
    return float(positive[y0:y1, x0:x1].sum() / total)


# ------------------------------------------------------------------------------------------------ methods
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


def default_methods(smooth_grad_samples: int = 8) -> Dict[str, Tuple[MapMaker, bool]]:
    """The methods of the table: name -> (map maker, whether it runs per decoder layer). SmoothGradCAM averages
    ``smooth_grad_samples`` noisy copies (noise 0.15 of the input's range, fixed seed); "Attention" is the raw
    attention of the last prompt token to the image tokens, heads averaged."""
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM

    from pytorch_grad_cam_vlm.attention import AttentionMap
    from pytorch_grad_cam_vlm.smooth_grad import SmoothGradCAM

    methods: Dict[str, Tuple[MapMaker, bool]] = {"Occlusion": (occlusion_method(), False)}
    for cls in (GradCAM, HiResCAM, GradCAMPlusPlus, LayerCAM, EigenCAM):
        methods[cls.__name__] = (grad_cam_method(cls), True)
    methods["SmoothGradCAM"] = (grad_cam_method(partial(SmoothGradCAM, n_samples=smooth_grad_samples, seed=0)), True)
    methods["Attention"] = (grad_cam_method(AttentionMap), True)
    for cls in (GradCAM, GradCAMPlusPlus):  # vision-encoder rows: the window order is undone by the reshape
        methods[f"{cls.__name__} (last vision block)"] = (grad_cam_method(cls, lambda w: w.vision_blocks[-1]), False)
        methods[f"{cls.__name__} (merger)"] = (grad_cam_method(cls, lambda w: w.merger), False)
    return methods


# ------------------------------------------------------------------------------------------------ table
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
    for name, (make, layered) in methods.items():
        for layer in (layers if layered else [None]):
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
            if progress:
                print(format_row(rows[-1]), flush=True)
    return rows


def answer_accuracy(wrapper: QwenVLWrapper, samples: Sequence) -> float:
    """Share of ``samples`` whose answer is the model's next token (argmax)."""
    wrappers: Dict[str, QwenVLWrapper] = {}
    correct = 0
    with torch.no_grad():
        for sample in samples:
            w = wrappers.setdefault(sample.prompt, QwenVLWrapper(wrapper.model, wrapper.processor, sample.prompt))
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples

    parser = argparse.ArgumentParser(description="Localization table of the demo model on held-out samples.")
    parser.add_argument("--n", type=int, default=200, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--methods", nargs="*", help="subset of method names (default: all)")
    parser.add_argument("--smooth-grad-samples", type=int, default=8, help="noisy copies per SmoothGradCAM map")
    args = parser.parse_args(argv)
    model, processor = load_demo_model()
    samples = make_demo_samples(args.n, seed=args.seed, split="test")
    wrapper = QwenVLWrapper(model, processor, samples[0].prompt)
    methods = default_methods(args.smooth_grad_samples)
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    accuracy = answer_accuracy(wrapper, samples)
    rows = localization_table(wrapper, samples, methods, progress=True)
    best = best_gradient_row(rows)
    occlusion = next(r for r in rows if r["method"] == "Occlusion")
    header = (f"Demo model, {args.n} held-out samples (split 'test', seed {args.seed}), answer accuracy "
              f"{accuracy:.3f}; pointing tolerance half a token cell (14 px); CPU, {torch.get_num_threads()} threads.\n"
              f"Best gradient method: {best['method']} at layer {best['layer']} (pointing {best['pointing']:.3f}, "
              f"distractor {best['distractor']:.3f}, {occlusion['seconds_per_map'] / best['seconds_per_map']:.0f}x "
              f"cheaper than occlusion); auto layer: {auto_layer(wrapper)}.\n\n")
    md_path, csv_path = write_table(rows, args.out, header)
    print(header + f"wrote {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
