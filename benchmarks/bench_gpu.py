"""Speed and memory of the package's methods on a GPU, on models of Qwen2.5-VL-3B's and -7B's shapes (issue 16).

Models: Qwen2.5-VL-3B-Instruct and -7B-Instruct built from their published config values (written below, nothing is
downloaded) with random weights in bf16, made directly on the device; the processor is the package's offline one
(a word-level tokenizer with Qwen's special tokens and chat template, Qwen's real min/max pixels), and the model's
image, video and vision start/end token ids are the processor's. The vocabulary stays 151936. Random weights do not
change the work a method does, only its maps.

For each model and image size (448x448, 1024x1024: the processor resizes 1024 to 1036, a multiple of 28):

  forward         the wrapper's forward pass, no gradient
  gradcam         GradCAM at the middle decoder layer
  smooth16/50     SmoothGradCAM, n_samples=16 / 50 (``--smooth-batch-size``; default: the package's default)
  sweep           layer_sweep(GradCAM) over every usable decoder layer (select_layers(n, "all"))
  auto            the package's automatic choice (methods.auto.explain), when the package has it
  attention       AttentionMap at the middle decoder layer (eager attention for the call)
  road            ROAD: FastROADMostRelevantFirstAverage + FastROADLeastRelevantFirstAverage over 9 percentiles
                  (``--road-sizes``; the imputation runs on the CPU)
  plain_gradcam   baseline: GradCAM the way plain grad-cam runs it: QwenVLWrapper(..., efficient_gradients=False),
                  parameters requiring grad (every weight gradient computed, the whole graph built)
  plain_loop16    baseline: 16 such plain GradCAM calls on the 16 noisy copies SmoothGradCAM n=16 would use
  loop16          16 GradCAM calls on the same copies through the default (efficient) wrapper
  batch           SmoothGradCAM n=16 at each of ``--batch-sizes``: the data for the CUDA batch-size default

Time: CUDA events around each call (``time.perf_counter`` on the CPU), after ``--warmup`` calls, the median of
``--repeats`` calls (ROAD: ``--road-repeats``, no warm-up). Every call returns numpy maps, so it ends synchronised.
Memory (CUDA): ``torch.cuda.max_memory_allocated()`` during a call minus the weights (what is allocated once the
model is built), the largest over the calls; plain grad-cam's weight gradients count in it.

FLOP floor of a call: the matrix products a call cannot avoid, per image,

  forward   F = 2 * P_vision * N_patches + 2 * P_merger * N_patches / 4        (P: parameters of 2-D+ weights)
              + sum over vision blocks of attention: 4 * N_patches^2 * d_vision (full-attention blocks),
                4 * sum over windows of n_window^2 * d_vision (window blocks)
              + 2 * P_decoder_layer * N_tokens + 2 * N_tokens^2 * d_text per decoder layer (causal attention)
              + 2 * vocab * d_text * (positions whose logits are kept: 1)
  backward  B(t) = down to decoder layer t's output, input gradients only (the parameters are frozen):
                2 * vocab * d_text + sum over layers above t of (2 * P_layer * N_tokens + 2 * (2 * N_tokens^2 * d_text))
              (a linear layer's input gradient costs its forward again; attention's backward twice its forward)
  floor     = forward images * F + backward images * B(deepest target layer)

Forward images and images with a graph are counted during the call by a forward pre-hook on ``lm_head`` (a
pre-hook: it does not count as a watched layer and does not move where the wrapper starts the graph). The floor
time is floor / ``--peak-tflops`` (default 989: H100 SXM dense bf16); "time / floor" <= 2 is the issue's goal.
Plain grad-cam's weight gradients (another 1x of the forward) are work the task does not need, so its floor is the
same as GradCAM's.

    python benchmarks/bench_gpu.py --models 3b,7b --sizes 448,1024 --device cuda --out $OUT
    python benchmarks/bench_gpu.py --models 7b --sizes 1024 --only smooth16,plain_loop16,batch --batch-sizes 1,2,4,8,16
    python benchmarks/bench_gpu.py --tiny --device cpu --repeats 1     # the script end to end on a small model
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import AttentionMap, QwenVLWrapper, SmoothGradCAM
from pytorch_grad_cam_vlm.methods.sweep import layer_sweep, select_layers
from pytorch_grad_cam_vlm.metrics.road import (PERCENTILES, FastROADLeastRelevantFirstAverage,
                                               FastROADMostRelevantFirstAverage)
from pytorch_grad_cam_vlm.models.tiny.qwen_vl import build_processor

PROMPT = "What color is the circle?"
NOISE_LEVEL = 0.15
SEED = 0
# Qwen2.5-VL's image processor (preprocessor_config.json): 4 to 16384 tokens of 28x28 pixels.
MIN_PIXELS, MAX_PIXELS = 3136, 12845056

# Published config.json values of Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct. The text fields sit at
# the top level of config.json and in text_config here; bos/eos/pad and the vision token ids come from the processor.
TEXT = dict(vocab_size=151936, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
            max_position_embeddings=128000, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
            attention_dropout=0.0, initializer_range=0.02, use_sliding_window=False, sliding_window=32768)
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              hidden_act="silu", tokens_per_second=2)
CONFIGS = {
    "3b": dict(text=dict(TEXT, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, max_window_layers=70, tie_word_embeddings=True),
               vision=dict(VISION, out_hidden_size=2048)),
    "7b": dict(text=dict(TEXT, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, max_window_layers=28, tie_word_embeddings=False),
               vision=dict(VISION, out_hidden_size=3584)),
    # --tiny: the same architecture and vocabulary, small widths and depths, to check the script on a CPU.
    "tiny": dict(text=dict(TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_window_layers=4, tie_word_embeddings=False,
                           rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]}),
                 vision=dict(VISION, depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                             fullatt_block_indexes=[1, 3])),
}
MEASUREMENTS = ("forward", "gradcam", "smooth16", "smooth50", "sweep", "auto", "attention", "road", "plain_gradcam",
                "plain_loop16", "loop16", "batch")


# ------------------------------------------------------------------------------------------------ model
def qwen_config(spec: dict, tokenizer):
    """A ``Qwen2_5_VLConfig`` of ``spec``'s sizes whose special token ids are the processor's, wired as
    ``models.tiny.qwen_vl.tiny_config`` wires them."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(spec["text"], bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"))
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(spec["vision"]), image_token_id=ids("<|image_pad|>"),
                            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"),
                            tie_word_embeddings=spec["text"]["tie_word_embeddings"])


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """(model, processor): random weights of ``dtype`` made on ``device``, in eval mode, parameters requiring grad
    as after ``from_pretrained``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = build_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    config = qwen_config(CONFIGS[name], processor.tokenizer)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), processor


# ------------------------------------------------------------------------------------------------ FLOPs
def matrix_parameters(module: torch.nn.Module) -> int:
    """Parameters of the weights that multiply activations (2-D and more: linear and patch-embedding weights)."""
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def window_pairs(rows: int, columns: int, window: int) -> int:
    """Sum over the windows of a ``rows x columns`` patch grid cut into ``window x window`` windows (the last ones
    smaller) of (patches in the window)^2: the query-key pairs of window attention."""
    def squares(side):
        return sum(min(window, side - start) ** 2 for start in range(0, side, window))
    return squares(rows) * squares(columns)


@dataclass
class FlopModel:
    """Per-image FLOPs of the forward pass and of the input-gradient backward pass (see the module docstring)."""

    vision: float
    layer_linear: List[float]
    layer_attention: List[float]
    head: float
    n_patches: int
    n_tokens: int

    @classmethod
    def of(cls, wrapper: QwenVLWrapper, height: int, width: int) -> "FlopModel":
        model, visual = wrapper.model, wrapper.visual
        vision_config = model.config.vision_config
        patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
        gh, gw = height // patch, width // patch
        n_patches = gh * gw
        d_vision = vision_config.hidden_size
        window = vision_config.window_size // patch  # 112 px: 8 x 8 patches
        full = set(vision_config.fullatt_block_indexes)
        vision = 2 * matrix_parameters(visual.patch_embed) * n_patches
        vision += 2 * matrix_parameters(visual.merger) * n_patches // (merge * merge)
        for i, block in enumerate(wrapper.vision_blocks):
            vision += 2 * matrix_parameters(block) * n_patches
            pairs = n_patches ** 2 if i in full else window_pairs(gh, gw, window)
            vision += 4 * pairs * d_vision
        n_tokens = int(wrapper.layout_for(height, width).text_inputs["input_ids"].shape[1])
        d_text = model.config.text_config.hidden_size
        layer_linear = [2 * matrix_parameters(layer) * n_tokens for layer in wrapper.decoder_layers]
        layer_attention = [2 * n_tokens ** 2 * d_text for _ in wrapper.decoder_layers]  # causal: half of 4 N^2 d
        head = 2 * model.lm_head.weight.numel()
        return cls(vision, layer_linear, layer_attention, head, n_patches, n_tokens)

    @property
    def forward(self) -> float:
        return self.vision + sum(self.layer_linear) + sum(self.layer_attention) + self.head

    def backward_to(self, layer: int) -> float:
        above = range(layer + 1, len(self.layer_linear))
        return self.head + sum(self.layer_linear[i] + 2 * self.layer_attention[i] for i in above)


# ------------------------------------------------------------------------------------------------ timing
class ImageCounter:
    """Counts the images that reach ``lm_head`` and those of them inside an autograd graph, with a pre-hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.forward = self.with_graph = 0
        self.handle = model.lm_head.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        hidden = args[0]
        self.forward += hidden.shape[0]
        self.with_graph += hidden.shape[0] if hidden.requires_grad else 0

    def reset(self) -> None:
        self.forward = self.with_graph = 0


@dataclass
class Measurement:
    seconds: List[float]
    peak_extra_bytes: Optional[int]
    forward_images: int
    graph_images: int
    result: object = field(repr=False, default=None)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class Bench:
    def __init__(self, device: torch.device, counter: ImageCounter, weights_bytes: int) -> None:
        self.device, self.counter, self.weights_bytes = device, counter, weights_bytes
        self.cuda = device.type == "cuda"

    def _timed(self, run: Callable[[], object]):
        if not self.cuda:
            start = time.perf_counter()
            result = run()
            return time.perf_counter() - start, result
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        result = run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, result

    def measure(self, run: Callable[[], object], repeats: int, warmup: int) -> Measurement:
        for _ in range(warmup):
            run()
        seconds, peaks, result = [], [], None
        for _ in range(repeats):
            result = None  # the previous call's outputs are freed before the next one
            gc.collect()
            self.counter.reset()
            if self.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
            elapsed, result = self._timed(run)
            seconds.append(elapsed)
            if self.cuda:
                peaks.append(torch.cuda.max_memory_allocated(self.device) - self.weights_bytes)
        return Measurement(seconds, max(peaks) if peaks else None, self.counter.forward, self.counter.with_graph,
                           result)


# ------------------------------------------------------------------------------------------------ methods
def noisy_copies(x: torch.Tensor, n: int) -> List[torch.Tensor]:
    """n copies of x with SmoothGrad's noise (std NOISE_LEVEL x (max - min)), drawn from one seeded generator."""
    generator = torch.Generator().manual_seed(SEED)
    spread = NOISE_LEVEL * (x.max() - x.min())
    return [x + spread * torch.randn(x.shape, generator=generator) for _ in range(n)]


def gradcam_loop(wrapper: QwenVLWrapper, layer: torch.nn.Module, copies, targets) -> np.ndarray:
    """The loop a user writes: GradCAM on each noisy copy, maps averaged."""
    with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform) as cam:
        maps = [cam(copy, targets) for copy in copies]
    return scale_cam_image(np.mean(maps, axis=0))


def find_auto():
    """``(name, function, lowest candidate layer function)`` of the package's automatic explanation, or Nones:
    another change is adding it, so it is looked up when the script runs."""
    import importlib

    import pytorch_grad_cam_vlm

    owners = [pytorch_grad_cam_vlm]
    try:
        owners.insert(0, importlib.import_module("pytorch_grad_cam_vlm.methods.auto"))
    except ImportError:
        pass
    for owner in owners:
        for name in ("explain", "auto_explain"):
            function = getattr(owner, name, None)
            if callable(function):
                return f"{owner.__name__}.{name}", function, getattr(owner, "candidate_layers", None)
    return None, None, None


@dataclass
class Row:
    model: str
    image: str
    key: str
    run: str
    median_s: float
    seconds: List[float]
    peak_extra_gib: Optional[float]
    peak_extra_of_weights: Optional[float]
    forward_images: int
    graph_images: int
    floor_tflop: float
    floor_s: float
    time_over_floor: float
    compared: str = ""
    note: str = ""


def run_config(name: str, size: int, args, device: torch.device, model, processor, rows: List[Row]) -> None:
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    plain = QwenVLWrapper(model, processor, prompt=PROMPT, efficient_gradients=False)
    image = (np.random.RandomState(SEED).rand(size, size, 3) * 255).astype(np.uint8)
    x = wrapper.preprocess(image)
    height, width = x.shape[2:]
    flops = FlopModel.of(wrapper, height, width)
    n_layers = len(wrapper.decoder_layers)
    middle = n_layers // 2
    layer = wrapper.decoder_layers[middle]
    with torch.no_grad():
        token = int(wrapper(x).argmax())
    targets = [ClassifierOutputTarget(token)]
    copies = noisy_copies(x, 16)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else \
        sum(p.numel() * p.element_size() for p in model.parameters())
    counter = ImageCounter(model)
    bench = Bench(device, counter, weights)
    peak_flops = args.peak_tflops * 1e12
    print(f"\n## {name}, image {size}x{size} (processed {height}x{width}): {flops.n_patches} patches, "
          f"{flops.n_tokens} tokens, {n_layers} decoder layers (middle: {middle}); weights "
          f"{weights / 2 ** 30:.2f} GiB; forward floor {flops.forward / 1e12:.3f} TFLOP", flush=True)

    def cam_call(method, layers, **options):
        def run():
            with method(model=wrapper, target_layers=layers, reshape_transform=wrapper.reshape_transform,
                        **options) as cam:
                return cam(x, targets)
        return run

    smooth_options = {} if args.smooth_batch_size is None else {"batch_size": args.smooth_batch_size}
    sweep_layers = select_layers(n_layers, "all")
    auto_name, auto_function, auto_candidates = find_auto()
    plan: Dict[str, tuple] = {}  # key -> (label, run, deepest target layer, repeats, warmup)
    repeats, warmup = args.repeats, args.warmup

    def forward():
        with torch.no_grad():
            return wrapper(x).float().cpu().numpy()

    plan["forward"] = ("forward pass (no grad)", forward, None, repeats, warmup)
    plan["gradcam"] = (f"GradCAM, layer {middle}", cam_call(GradCAM, [layer]), middle, repeats, warmup)
    for n in (16, 50):
        batch = smooth_options.get("batch_size", "default")
        plan[f"smooth{n}"] = (f"SmoothGradCAM n={n}, batch_size={batch}",
                              cam_call(SmoothGradCAM, [layer], n_samples=n, noise_level=NOISE_LEVEL, seed=SEED,
                                       **smooth_options), middle, repeats, warmup)
    plan["sweep"] = (f"layer_sweep(GradCAM), {len(sweep_layers)} layers",
                     cam_call(layer_sweep(GradCAM), [wrapper.decoder_layers[i] for i in sweep_layers]),
                     min(sweep_layers), repeats, warmup)
    if auto_function is not None:
        lowest = min(auto_candidates(n_layers, True)) if auto_candidates else 0
        plan["auto"] = (f"auto ({auto_name})", lambda: auto_function(wrapper, x, targets), lowest, repeats, warmup)

    def attention():
        with AttentionMap(model=wrapper, target_layers=[layer]) as cam:
            return cam(x, targets)
    plan["attention"] = (f"AttentionMap, layer {middle}", attention, None, repeats, warmup)
    if size in args.road_sizes:
        def road():
            maps = cam_call(GradCAM, [layer])()
            torch.manual_seed(SEED)
            morf = FastROADMostRelevantFirstAverage(PERCENTILES)(x, maps, targets, wrapper)
            lerf = FastROADLeastRelevantFirstAverage(PERCENTILES)(x, maps, targets, wrapper)
            return morf, lerf
        plan["road"] = (f"ROAD MoRF + LeRF, {len(PERCENTILES)} percentiles (with its GradCAM map)", road, middle,
                        args.road_repeats, 0)

    def plain_gradcam():
        with GradCAM(model=plain, target_layers=[plain.decoder_layers[middle]],
                     reshape_transform=plain.reshape_transform) as cam:
            return cam(x, targets)
    plan["plain_gradcam"] = ("baseline: GradCAM, plain grad-cam (efficient_gradients=False)", plain_gradcam, middle,
                             repeats, warmup)
    plan["plain_loop16"] = ("baseline: 16 x GradCAM, plain grad-cam",
                            lambda: gradcam_loop(plain, plain.decoder_layers[middle], copies, targets), middle,
                            repeats, warmup)
    plan["loop16"] = ("16 x GradCAM, default wrapper", lambda: gradcam_loop(wrapper, layer, copies, targets), middle,
                      repeats, warmup)
    for b in args.batch_sizes:
        plan[f"batch{b}"] = (f"SmoothGradCAM n=16, batch_size={b}",
                             cam_call(SmoothGradCAM, [layer], n_samples=16, noise_level=NOISE_LEVEL, seed=SEED,
                                      batch_size=b), middle, repeats, warmup)

    selected = [k for k in plan if (k[:5] if k.startswith("batch") else k) in args.only]
    if "auto" in args.only and auto_function is None:
        print("auto: not measured, the package has no automatic explanation (pytorch_grad_cam_vlm.methods.auto."
              "explain) yet", flush=True)
    measured: Dict[str, Row] = {}
    try:
        for key in selected:
            label, run, deepest, key_repeats, key_warmup = plan[key]
            try:
                m = bench.measure(run, key_repeats, key_warmup)
            except torch.cuda.OutOfMemoryError as error:  # noqa: PERF203 - one message per run
                print(f"{label}: out of memory ({str(error).splitlines()[0]})", flush=True)
                torch.cuda.empty_cache()
                continue
            except Exception as error:  # a run that fails (e.g. auto's API changed) must not stop the others
                print(f"{label}: failed, {type(error).__name__}: {error}", flush=True)
                continue
            finally:
                if key.startswith("plain"):
                    model.zero_grad(set_to_none=True)  # plain grad-cam leaves weight gradients behind
            floor = m.forward_images * flops.forward
            if deepest is not None:
                floor += m.graph_images * flops.backward_to(deepest)
            note = map_note(m.result)
            row = Row(name, f"{size}x{size}", key, label, m.median, m.seconds,
                      None if m.peak_extra_bytes is None else m.peak_extra_bytes / 2 ** 30,
                      None if m.peak_extra_bytes is None else m.peak_extra_bytes / weights,
                      m.forward_images, m.graph_images, floor / 1e12, floor / peak_flops,
                      m.median / (floor / peak_flops), note=note)
            measured[key] = row
            rows.append(row)
            print(f"{label}: median {m.median:.4f} s over {len(m.seconds)}; peak - weights "
                  f"{'-' if row.peak_extra_gib is None else f'{row.peak_extra_gib:.2f} GiB'}; "
                  f"{m.forward_images} forward / {m.graph_images} graph images; time / floor "
                  f"{row.time_over_floor:.1f}{'; ' + note if note else ''}", flush=True)
    finally:
        counter.handle.remove()
    compare(measured)


def map_note(result) -> str:
    maps = result[0] if isinstance(result, tuple) else getattr(result, "maps", result)
    if isinstance(maps, np.ndarray) and maps.dtype.kind == "f" and not np.isfinite(maps).all():
        return "map not finite"
    return ""


def compare(rows: Dict[str, Row]) -> None:
    """The ratios of the issue's goals, written into each row's ``compared``."""
    def ratio(key, reference, faster_text, slower_text):
        if key in rows and reference in rows:
            r = rows[reference].median_s / rows[key].median_s
            rows[key].compared = (f"{r:.2f}x faster than {faster_text}" if r >= 1
                                  else f"{1 / r:.2f}x the time of {slower_text}")

    ratio("gradcam", "plain_gradcam", "plain grad-cam", "plain grad-cam")
    ratio("smooth16", "plain_loop16", "16 plain grad-cam calls", "16 plain grad-cam calls")
    ratio("loop16", "plain_loop16", "16 plain grad-cam calls", "16 plain grad-cam calls")
    for key in [k for k in rows if k.startswith("batch")]:
        ratio(key, "plain_loop16", "16 plain grad-cam calls", "16 plain grad-cam calls")
    for key, reference, text in (("sweep", "gradcam", "one layer's GradCAM"), ("auto", "gradcam", "GradCAM"),
                                 ("smooth50", "smooth16", "n=16"), ("attention", "forward", "a forward pass"),
                                 ("road", "forward", "a forward pass")):
        if key in rows and reference in rows:
            rows[key].compared = f"{rows[key].median_s / rows[reference].median_s:.2f}x the time of {text}"


# ------------------------------------------------------------------------------------------------ report
def table(rows: List[Row]) -> str:
    lines = ["| model | image | run | median (s) | peak - weights (GiB) | of weights | images fwd / graph | "
             "floor (TFLOP) | time / floor | compared |", "|" + "---|" * 10]
    for r in rows:
        memory = "-" if r.peak_extra_gib is None else f"{r.peak_extra_gib:.2f}"
        share = "-" if r.peak_extra_of_weights is None else f"{100 * r.peak_extra_of_weights:.0f}%"
        lines.append(f"| {r.model} | {r.image} | {r.run} | {r.median_s:.4f} | {memory} | {share} | "
                     f"{r.forward_images} / {r.graph_images} | {r.floor_tflop:.3f} | {r.time_over_floor:.1f} | "
                     f"{r.compared}{' (' + r.note + ')' if r.note else ''} |")
    return "\n".join(lines)


def goals(rows: List[Row]) -> str:
    """The issue's goals, one line each per model and image."""
    lines = []
    for model, image in dict.fromkeys((r.model, r.image) for r in rows):
        at = {r.key: r for r in rows if (r.model, r.image) == (model, image)}
        checks = []
        if "smooth16" in at:
            checks.append(("SmoothGradCAM n=16 <= 1 s", f"{at['smooth16'].median_s:.3f} s",
                           at["smooth16"].median_s <= 1))
            if "plain_loop16" in at:
                r = at["plain_loop16"].median_s / at["smooth16"].median_s
                checks.append((">= 5x faster than 16 plain grad-cam calls", f"{r:.2f}x", r >= 5))
        if "sweep" in at and "gradcam" in at:
            r = at["sweep"].median_s / at["gradcam"].median_s
            checks.append(("sweep <= 1.5x one layer", f"{r:.2f}x", r <= 1.5))
        ours = [r for k, r in at.items() if not k.startswith(("plain", "loop", "road", "batch"))
                and r.peak_extra_of_weights is not None]
        if ours:
            worst = max(ours, key=lambda r: r.peak_extra_of_weights)
            checks.append(("peak memory <= weights + 25%", f"+{100 * worst.peak_extra_of_weights:.0f}% ({worst.key})",
                           worst.peak_extra_of_weights <= 0.25))
        for key in ("gradcam", "smooth16", "sweep"):
            if key in at:
                checks.append((f"{key} within 2x of the FLOP floor", f"{at[key].time_over_floor:.1f}x",
                               at[key].time_over_floor <= 2))
        lines += [f"- {model} {image}: {goal}: {value} -> {'met' if ok else 'NOT met'}" for goal, value, ok in checks]
    return "\n".join(lines)


def batch_table(rows: List[Row]) -> str:
    batch = [r for r in rows if r.key.startswith("batch")]
    if not batch:
        return ""
    lines = ["| model | image | batch_size | median (s) | peak - weights (GiB) | of weights | time / floor |",
             "|" + "---|" * 7]
    for r in batch:
        memory = "-" if r.peak_extra_gib is None else f"{r.peak_extra_gib:.2f}"
        share = "-" if r.peak_extra_of_weights is None else f"{100 * r.peak_extra_of_weights:.0f}%"
        lines.append(f"| {r.model} | {r.image} | {r.key[5:]} | {r.median_s:.4f} | {memory} | {share} | "
                     f"{r.time_over_floor:.1f} |")
    return "\n".join(lines)


def environment(device: torch.device, args) -> dict:
    import transformers

    info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                device=str(device), dtype=args.dtype, peak_tflops=args.peak_tflops, repeats=args.repeats,
                warmup=args.warmup, cpu_threads=torch.get_num_threads(), argv=sys.argv[1:])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    return info


def write_outputs(folder: str, rows: List[Row], env: dict, tag: str) -> None:
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, f"bench_gpu_{tag}")
    with open(base + ".json", "w") as f:
        json.dump(dict(environment=env, rows=[asdict(r) for r in rows]), f, indent=1)
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])) if rows else ["model"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ";".join(f"{s:.5f}" for s in v) if isinstance(v, list) else v
                             for k, v in asdict(r).items()})
    print(f"\nwrote {base}.json and {base}.csv")


def parse_list(text: str, cast=str) -> list:
    return [cast(part.strip()) for part in text.split(",") if part.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="3b,7b", help="comma-separated: 3b, 7b")
    parser.add_argument("--tiny", action="store_true", help="a small model of the same architecture (CPU check)")
    parser.add_argument("--sizes", default="448,1024", help="square image sides in pixels")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per run; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--only", default=",".join(MEASUREMENTS),
                        help="comma-separated runs: " + ", ".join(MEASUREMENTS))
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="SmoothGradCAM n=16 batch sizes to compare")
    parser.add_argument("--smooth-batch-size", type=int, default=None,
                        help="batch_size of the smooth16/smooth50 runs (default: the package's default)")
    parser.add_argument("--road-sizes", default="448", help="image sizes that get the ROAD run (CPU-bound)")
    parser.add_argument("--road-repeats", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--out", default=None, help="folder for bench_gpu_<models>_<sizes>.json and .csv")
    args = parser.parse_args(argv)
    args.only = set(parse_list(args.only))
    unknown = args.only - set(MEASUREMENTS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}: choose among {', '.join(MEASUREMENTS)}")
    args.batch_sizes = parse_list(args.batch_sizes, int)
    args.road_sizes = parse_list(args.road_sizes, int)
    sizes = parse_list(args.sizes, int)
    models = ["tiny"] if args.tiny else parse_list(args.models, str.lower)
    if any(m not in CONFIGS for m in models):
        parser.error(f"--models takes {', '.join(k for k in CONFIGS if k != 'tiny')}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here: use --device cpu (with --tiny to check the script)")
    dtype = getattr(torch, args.dtype)
    warnings.filterwarnings("ignore", category=UserWarning)

    env = environment(device, args)
    print("# bench_gpu: " + ", ".join(f"{k}={v}" for k, v in env.items() if k != "argv"), flush=True)
    if device.type != "cuda":
        print(f"# on the CPU: no peak memory, and time / floor is against {args.peak_tflops:g} TFLOP/s (a GPU's "
              "peak): this run only checks that the script works", flush=True)
    rows: List[Row] = []
    for name in models:
        start = time.perf_counter()
        model, processor = build_model(name, device, dtype)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"\n# {name}: {parameters / 1e9:.3f} B parameters ({dtype}), built in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        for size in sizes:
            run_config(name, size, args, device, model, processor, rows)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n" + table(rows))
    if batch_table(rows):
        print("\nSmoothGradCAM n=16 by batch size:\n\n" + batch_table(rows))
    print("\nGoals of issue 16:\n" + goals(rows))
    if args.out:
        write_outputs(args.out, rows, env, f"{'-'.join(models)}_{'-'.join(map(str, sizes))}")


if __name__ == "__main__":
    main()
