"""SmoothGrad for every grad-cam method: noisy copies of the input, run through the method in batches, averaged.

``SmoothGradCAM`` is ``GradCAM`` with a smoother map; it takes the same constructor, call, targets, ``aug_smooth`` and
``eigen_smooth``. ``smooth(MyCAM)`` makes the smoothed twin of any ``BaseCAM`` subclass.

References: Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise" (arXiv:1706.03825), and Omeiza et al.
2019, "Smooth Grad-CAM++" (arXiv:1908.01224), which averages gradients before Grad-CAM++'s weighting.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from pytorch_grad_cam import (EigenCAM, EigenGradCAM, FullGrad, GradCAM, GradCAMElementWise, GradCAMPlusPlus,
                              HiResCAM, LayerCAM, ScoreCAM, XGradCAM)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.methods.noise import NOISE_KINDS, noise_stream
from pytorch_grad_cam_vlm.models.state import explaining, graph_starts_at
from pytorch_grad_cam_vlm.methods.shapley_cam import ShapleyCAM

# Measured with benchmarks/bench_smooth.py (CPU, 2 threads, n=16): batches of 8 took half the CPU time of one copy at
# a time (18 s against 35 s; batches of 4: within 10% of 8), for 6x the peak memory (about 300 MiB against 50 MiB).
# CUDA, measured with benchmarks/bench_gpu.py on one H100 (Qwen2.5-VL-3B's shape, bf16, 448x448, n=16;
# benchmarks/gpu.md): batches of 1, 2, 4, 8, 16 took 2.80, 1.45, 1.18, 0.88, 0.82 s for 0.5, 0.95, 1.9, 3.7, 7.3 GiB
# above the weights: 8 is within 7% of 16's time at half its memory.
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 8}
AVERAGES = ("maps", "gradients")
VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")


class _OutsideGraph(Exception):
    """A target layer ran outside the autograd graph started at the first target layer (a parallel branch)."""


class SmoothGrad:
    """Mixin that turns a grad-cam method into its SmoothGrad twin: ``class SmoothGradCAM(SmoothGrad, GradCAM)``.

    Keyword-only options, all optional, so that the constructor stays the base method's:

    - ``n_samples`` (50, Smilkov et al.: little changes beyond 50): noisy copies per input.
    - ``noise_level`` (0.15, Smilkov et al.: 10-20% works best): the noise's standard deviation as a fraction of
      ``max - min`` of each input, in the input space the model receives (normalised pixels for the VLM wrappers).
      Copy ``s`` of input ``i`` is ``x[i] + noise_level * (x[i].max() - x[i].min()) * e[i, s]``, with ``e`` drawn
      copy after copy in the order ``(i, s)``, so the batching does not change the noise. ``noise_level=0`` runs the
      input once and gives the base method's map.
    - ``noise`` (``"iid"``): how the standard-normal ``e[i, :]`` of an input's copies are drawn (:func:`noise_draws`).
      ``"iid"``: independent ``randn``. ``"antithetic"``: pairs ``e, -e`` (copies ``x + d, x - d``), with an odd
      ``n_samples`` the last copy unpaired. ``"sobol"``: scrambled Sobol points through the normal inverse CDF
      (best with ``n_samples`` a power of 2). ``"latin"``: a Latin hypercube per pixel. Each copy's noise is exactly
      ``N(0, I)`` in every kind, so every kind estimates the same smoothed map; they differ in its spread. Measured
      with benchmarks/bench_smooth_convergence.py on three models: no kind reached i.i.d.'s error at 50 copies with
      24 on all of them (hence the default), ``"sobol"`` and ``"latin"`` did with 32.
    - ``batch_size`` (``None``: 8, from measurements on CPU): noisy copies per pass through the model; memory stays
      bounded by one batch (lower it for a large model), and the result does not depend on it beyond float rounding.
    - ``seed`` (``None``: torch's global generator): the seed of a CPU generator, so a map is reproducible and the
      same on every device, for every ``noise``.
    - ``average``: ``"maps"`` (default, SmoothGrad: the mean over the copies of the method's per-layer maps, each
      scaled to [0, 1] and resized as grad-cam's ``compute_cam_per_layer`` makes it, then aggregated once) or
      ``"gradients"`` (Smooth Grad-CAM++: the mean of each layer's activations and gradients over the copies, then
      the method's weighting, once). ``"gradients"`` needs a method that weights gradients and activations.
    - ``variant`` (Captum's NoiseTunnel, for ``average="maps"``): ``"smoothgrad"`` (mean), ``"smoothgrad_sq"``
      (mean of squared maps), ``"vargrad"`` (variance of the maps). Averaged gradients keep their sign, which the
      methods' weightings need, so ``average="gradients"`` takes ``"smoothgrad"`` only.

    ``targets=None`` explains the class the model predicts for the clean input, in every copy.

    Speed: parameters are frozen during the call (restored after), so no weight gradient is computed; the graph starts
    at the first target layer that runs (or where a wrapper with ``efficient_gradients`` starts it), so nothing below
    it builds one; gradient-free methods build none. grad-cam's ``forward`` runs ``backward(retain_graph=True)``:
    every reference to a batch's graph is dropped right after its backward, so one batch's graph lives at a time.

    Multi-layer contract: the per-layer maps are averaged over the copies first, and the call ends with exactly one
    ``self.aggregate_multi_layers(per_layer_maps)`` on a list of ``(B, 1, H, W)`` arrays (FullGrad: its own array),
    so a mixin placed before it that overrides ``aggregate_multi_layers`` (a layer sweep:
    ``class X(LayerSweep, SmoothGrad, GradCAM)``) receives the smoothed map of every layer.

    A base method's own argument with one of these names (AblationCAM's ``batch_size``) must be passed positionally.
    """

    def __init__(self, *args, n_samples: int = 50, noise_level: float = 0.15, batch_size: Optional[int] = None,
                 seed: Optional[int] = None, average: str = "maps", variant: str = "smoothgrad", noise: str = "iid",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        try:
            self._check_options(n_samples, noise_level, batch_size, average, variant, noise)
        except ValueError:
            self.activations_and_grads.release()  # the base method hooked the target layers already
            raise
        self.n_samples = n_samples
        self.noise_level = float(noise_level)
        # Not `batch_size`: ScoreCAM and AblationCAM read their own `self.batch_size`.
        self.sample_batch_size = batch_size or DEFAULT_BATCH_SIZE.get(self.device.type, 8)
        self.seed = seed
        self.average = average
        self.variant = variant
        self.noise = noise

    def _check_options(self, n_samples, noise_level, batch_size, average, variant, noise) -> None:
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a whole number >= 1, got {n_samples!r}.")
        if not 0 <= noise_level <= 1:
            raise ValueError(f"noise_level is the noise's standard deviation as a fraction of each input's max - min: "
                             f"give a number in 0..1 (0.15 by default; 0.1-0.2 works best), got {noise_level!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a whole number >= 1 or None, got {batch_size!r}.")
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}.")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}.")
        if average == "gradients" and variant != "smoothgrad":
            raise ValueError(f"variant={variant!r} squares the averaged quantity and loses the gradients' sign, "
                             "which the method's weighting needs: use it with average='maps'.")
        if average == "gradients" and (not self.uses_gradients or not self.detach or self.compute_input_gradient):
            raise ValueError(f"{type(self).__name__} does not weight activations by their gradients alone, so they "
                             "cannot be averaged before its weighting: use average='maps'.")

    def forward(self, input_tensor: torch.Tensor, targets: Optional[List[torch.nn.Module]],
                eigen_smooth: bool = False) -> np.ndarray:
        input_tensor = input_tensor.detach().to(self.device)
        batch = input_tensor.shape[0]
        if targets is not None and len(targets) != batch:
            raise ValueError(f"Expected one target per input: got {len(targets)} targets for {batch} inputs.")
        copies = self.n_samples if self.noise_level > 0 else 1  # without noise every copy is the input itself
        graph_from = self._graph_mode()
        with explaining(self.model):
            if targets is None or graph_from == "layer":
                clean_outputs, first_layer = self._clean_pass(input_tensor)
                if targets is None:
                    categories = clean_outputs.argmax(dim=-1).tolist()
                    targets = [ClassifierOutputTarget(category) for category in categories]
                if graph_from == "layer" and first_layer is None:
                    graph_from = "input"  # no target layer ran in the clean pass: nowhere to start the graph
            else:
                clean_outputs, first_layer = None, None
            per_layer = self._smoothed_layers(input_tensor, targets, eigen_smooth, copies, graph_from, first_layer)
        self.outputs = clean_outputs
        return self.aggregate_multi_layers(per_layer)

    # ------------------------------------------------------------------------------------------------ graph
    def _graph_mode(self) -> str:
        """Where the autograd graph of a batch starts: ``"none"`` (gradient-free method), ``"model"`` (the method
        needs input gradients, or the model starts its own graph), or ``"layer"`` (at the first target layer)."""
        if not self.uses_gradients:
            return "none"
        if self.compute_input_gradient or getattr(self.model, "efficient_gradients", False):
            return "model"
        return "layer"

    def _clean_pass(self, input_tensor: torch.Tensor):
        """The model's output for the clean inputs (for ``targets=None``), and the target layer that runs first."""
        order: List[torch.nn.Module] = []
        handles = [layer.register_forward_pre_hook(lambda module, args: order.append(module))
                   for layer in self.target_layers]
        try:
            with torch.no_grad():
                outputs = self.model(input_tensor)
        finally:
            for handle in handles:
                handle.remove()
        return outputs.detach(), (order[0] if order else None)

    @contextmanager
    def _graph_starts_at(self, layer: torch.nn.Module) -> Iterator[None]:
        """``graph_starts_at(layer)``, refusing a target layer whose output stays outside the graph (a layer on a
        branch that does not go through ``layer``): its gradient would be missing and grad-cam would pair the
        layers' activations and gradients wrongly."""
        def check(module, args, output):
            output = output[0] if isinstance(output, tuple) else output
            if isinstance(output, torch.Tensor) and not output.requires_grad:
                raise _OutsideGraph

        handles = [target.register_forward_hook(check) for target in self.target_layers]
        try:
            with graph_starts_at(layer):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _graph(self, graph_from: str, first_layer: Optional[torch.nn.Module]) -> ContextManager:
        if graph_from == "none":
            return torch.no_grad()
        if graph_from == "layer":
            return self._graph_starts_at(first_layer)
        return nullcontext()

    # ------------------------------------------------------------------------------------------------ batches
    def _smoothed_layers(self, input_tensor: torch.Tensor, targets: Sequence[torch.nn.Module], eigen_smooth: bool,
                         copies: int, graph_from: str, first_layer: Optional[torch.nn.Module]):
        """Per-layer maps averaged over the noisy copies, in the form ``compute_cam_per_layer`` returns them."""
        batch = input_tensor.shape[0]
        flat = input_tensor.flatten(1)
        spread = self.noise_level * (flat.amax(dim=1) - flat.amin(dim=1))
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        # One stream per input, opened when its first copy is reached: the draws follow the order (i, s).
        draws = itertools.chain.from_iterable(noise_stream(self.noise, copies, input_tensor.shape[1:], generator)
                                              for _ in range(batch))
        sums: Optional[List[torch.Tensor]] = None  # per layer: sum over copies (maps, or activations and gradients)
        squares: Optional[List[torch.Tensor]] = None
        total = batch * copies
        for start in range(0, total, self.sample_batch_size):
            owners = torch.arange(start, min(start + self.sample_batch_size, total)) // copies
            chunk = input_tensor[owners]
            if self.noise_level > 0:
                noise = torch.stack([next(draws) for _ in owners])
                chunk = chunk + spread[owners].view(-1, *[1] * (chunk.dim() - 1)) * noise.to(chunk)
            chunk_targets = [targets[i] for i in owners.tolist()]
            try:
                values, as_list = self._run_batch(chunk, chunk_targets, eigen_smooth, graph_from, first_layer)
            except _OutsideGraph:  # rare: target layers on parallel branches; build the whole graph from now on
                graph_from, first_layer = "input", None
                values, as_list = self._run_batch(chunk, chunk_targets, eigen_smooth, graph_from, first_layer)
            if sums is None:
                sums = [torch.zeros((batch,) + v.shape[1:], dtype=torch.float64) for v in values]
                squares = [torch.zeros_like(s) for s in sums]
            for total_sum, total_square, value in zip(sums, squares, values):
                value = value.double()
                total_sum.index_add_(0, owners, value)
                total_square.index_add_(0, owners, value * value)
        means = [s / copies for s in sums]
        if self.average == "gradients":
            return self._weighted_means(input_tensor, targets, eigen_smooth, means)
        if self.variant == "smoothgrad_sq":
            means = [s / copies for s in squares]
        elif self.variant == "vargrad":
            means = [s / copies - m * m for s, m in zip(squares, means)]
        maps = [m.float().numpy() for m in means]
        return maps if as_list else maps[0]

    def _run_batch(self, chunk: torch.Tensor, targets: List[torch.nn.Module], eigen_smooth: bool, graph_from: str,
                   first_layer: Optional[torch.nn.Module]) -> Tuple[List[torch.Tensor], bool]:
        """The base method's forward on one batch of copies, stopped before it aggregates the layers. Returns the
        per-layer maps (``average="maps"``) or the layers' activations then gradients (``"gradients"``), and
        whether the method gives its per-layer maps as a list (FullGrad gives one array)."""
        captured = []
        # The base forward ends with self.aggregate_multi_layers(per-layer maps): while a batch runs, this instance
        # keeps them instead, so that the aggregation (and a layer sweep overriding it) runs once, on the averages.
        self.aggregate_multi_layers = captured.append
        if self.average == "gradients":
            self.compute_cam_per_layer = lambda *args: None  # only the raw activations and gradients are needed
        if graph_from == "input":
            chunk = chunk.requires_grad_(True)  # parameters are frozen: the input starts the graph
        try:
            with self._graph(graph_from, first_layer):
                super().forward(chunk, targets, eigen_smooth)
            if self.average == "gradients":
                activations, gradients = self.activations_and_grads.activations, self.activations_and_grads.gradients
                if not len(activations) == len(gradients) == len(self.target_layers):
                    raise ValueError(f"Got {len(activations)} activations and {len(gradients)} gradients for "
                                     f"{len(self.target_layers)} target layers (a layer that runs more than once, or "
                                     "whose output gets no gradient): use average='maps'.")
                return [v.detach().cpu() for v in activations + gradients], True
            per_layer = captured[0]
            if isinstance(per_layer, list):
                return [torch.from_numpy(np.asarray(m)) for m in per_layer], True
            return [torch.from_numpy(per_layer)], False
        finally:
            del self.aggregate_multi_layers
            self.__dict__.pop("compute_cam_per_layer", None)
            # Drop this batch's graph, which grad-cam's backward(retain_graph=True) keeps alive through them.
            self.outputs = None
            self.activations_and_grads.activations.clear()
            self.activations_and_grads.gradients.clear()

    def _weighted_means(self, input_tensor: torch.Tensor, targets: Sequence[torch.nn.Module], eigen_smooth: bool,
                        means: List[torch.Tensor]):
        """The method's per-layer maps from the activations and gradients averaged over the copies."""
        layers = len(self.target_layers)
        self.activations_and_grads.activations = [m.float() for m in means[:layers]]
        self.activations_and_grads.gradients = [m.float() for m in means[layers:]]
        try:
            return self.compute_cam_per_layer(input_tensor, list(targets), eigen_smooth)
        finally:
            self.activations_and_grads.activations = []
            self.activations_and_grads.gradients = []


def smooth(method: Type[BaseCAM]) -> Type[BaseCAM]:
    """The SmoothGrad twin of a grad-cam method, in one line: ``smooth(MyCAM)(model=..., target_layers=...)``."""
    if not (isinstance(method, type) and issubclass(method, BaseCAM)):
        raise TypeError(f"smooth() takes a subclass of pytorch_grad_cam's BaseCAM, got {method!r}.")
    name = f"Smooth{method.__name__}"
    return type(name, (SmoothGrad, method), {"__doc__": f"{method.__name__} averaged over noisy copies of the "
                                                        "input (see SmoothGrad).", "__qualname__": name})


class SmoothGradCAM(SmoothGrad, GradCAM):
    """GradCAM averaged over noisy copies of the input."""


class SmoothHiResCAM(SmoothGrad, HiResCAM):
    """HiResCAM averaged over noisy copies of the input."""


class SmoothGradCAMPlusPlus(SmoothGrad, GradCAMPlusPlus):
    """GradCAM++ averaged over noisy copies; ``average="gradients"`` averages before the weighting (Omeiza et al.)."""


class SmoothXGradCAM(SmoothGrad, XGradCAM):
    """XGradCAM averaged over noisy copies of the input."""


class SmoothLayerCAM(SmoothGrad, LayerCAM):
    """LayerCAM averaged over noisy copies of the input."""


class SmoothEigenGradCAM(SmoothGrad, EigenGradCAM):
    """EigenGradCAM averaged over noisy copies of the input."""


class SmoothGradCAMElementWise(SmoothGrad, GradCAMElementWise):
    """GradCAMElementWise averaged over noisy copies of the input."""


class SmoothScoreCAM(SmoothGrad, ScoreCAM):
    """ScoreCAM averaged over noisy copies of the input (gradient-free: no graph is built)."""


class SmoothEigenCAM(SmoothGrad, EigenCAM):
    """EigenCAM averaged over noisy copies of the input (gradient-free: no graph is built)."""


class SmoothShapleyCAM(SmoothGrad, ShapleyCAM):
    """ShapleyCAM averaged over noisy copies of the input (maps only: it needs the whole graph for its
    Hessian-vector product)."""


class SmoothFullGrad(SmoothGrad, FullGrad):
    """FullGrad averaged over noisy copies of the input (CNNs: it reads Conv2d/BatchNorm2d biases)."""
