"""The perturbation metrics of a map, batched: ROAD and the deletion / insertion AUC of one image and target.

ROAD (Rong et al. 2022): the image with the most (MoRF) or least (LeRF) relevant pixels removed at each percentile
``p`` and imputed, scored on the target's logit minus the clean image's. The masks are made by grad-cam's own
``RemoveMostRelevantFirst`` / ``RemoveLeastRelevantFirst`` and imputed by
:class:`~pytorch_grad_cam_vlm.metrics.road.FastNoisyLinearImputer`, so a row equals grad-cam's
``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst`` with that imputer, called percentile after percentile (MoRF
then LeRF) from the same torch seed: the systems are solved first, all at once, and the imputer's noise is drawn
afterwards in grad-cam's order.

Deletion and insertion (Petsiuk et al. 2018): the protocol (:mod:`~pytorch_grad_cam_vlm.metrics.auc_protocols`:
RISE's, EAGLE's, or this package's) gives the canvas of each curve, the pixels removed at each step and the order of
equal map values. Deletion replaces the map's most relevant pixels with the deletion canvas (lower AUC is better);
insertion starts from the insertion canvas and puts them back (higher is better). The curve is the target's softmax
probability (``"probability"``, as RISE and EAGLE report it; in [0, 1]) or its logit; the AUC is the trapezoid rule
over evenly spaced points. The end points, the clean image and the canvases, are scored once per image, not once
per map; they also give the saturation guard: a canvas that keeps :data:`SATURATION` or more of the clean image's
probability of the target (as where the model answers the same for a blank image) flags the row, and the
normalised AUC ``(AUC - canvas score) / (clean score - canvas score)`` of that curve is left out. The deletion
curve's images also give the share removed when the model's top answer first changes
(:mod:`~pytorch_grad_cam_vlm.metrics.answer_change`), with one more image: the map's top 10 % removed.

Every perturbed image of a map (``2 P`` for ROAD, ``2 (steps - 1)`` for the AUC) goes through the model in batches
of ``batch_size``. The imputation systems of a map are independent: on the CPU they are solved on the threads of an
``executor`` (a ``concurrent.futures.ThreadPoolExecutor``) while the AUC images go through the model; on CUDA by
batched conjugate gradients on the GPU (:func:`~pytorch_grad_cam_vlm.metrics.road_cg.impute_cg`).
:meth:`PerturbationScorer.start` lets a caller do more while they run (the benchmark runner scores the previous map's
ROAD images). Threads, not processes: scipy's SuperLU releases the GIL while it factors and solves. Measured by
``benchmarks/bench_benchmark.py --gil``: a pure-Python counter thread counted 7.7 M/s during a 1.1 s ``splu`` of a
336x336 imputation system, against 4.9 M/s beside a Python loop that holds the GIL and 12.0 M/s beside a sleep; a
call that held the GIL would have stopped it for the whole second. Threads also share the image and the masks, where
processes would pickle them and the solutions (``N x 3`` float64 per mask) both ways; ``bench_benchmark.py
--overlap`` compares the two beside the model's forward passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import RemoveLeastRelevantFirst, RemoveMostRelevantFirst
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.metrics.answer_change import first_change, top_share_count
from pytorch_grad_cam_vlm.metrics.auc_protocols import PROTOCOLS, AUCProtocol, canvas, removed_masks
from pytorch_grad_cam_vlm.metrics.deletion_check import auto_batch_size, target_scores
from pytorch_grad_cam_vlm.metrics.road import FastNoisyLinearImputer, impute_linear
from pytorch_grad_cam_vlm.metrics.road_cg import impute_cg

AUC_SCORES = ("probability", "logit")
SOLVERS = ("auto", "direct", "cg")
# A canvas that keeps this share of the clean image's probability of the target flags the row. Measured in
# benchmarks/auc_canvas.md on both development models: a canvas keeps either less than 0.1 or more than 0.9 of it
# on 97-100 % of samples, and keeps 0.5 or more exactly where it leaves the model's top answer unchanged.
SATURATION = 0.5


class ProbabilityTarget:
    """The softmax probability of class ``category`` (a token, a text) in a row of model outputs."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(output.float(), dim=-1)[..., self.category]


def _keep_mask(img, mask: torch.Tensor) -> torch.Tensor:
    """An "imputer" that returns the binary mask grad-cam's perturbation made."""
    return mask


def road_masks(cam: np.ndarray, percentiles: Sequence[float]) -> List[np.ndarray]:
    """ROAD's binary masks (1 keeps a pixel) of ``cam`` ``(H, W)``: MoRF at each percentile, then LeRF, as
    grad-cam's ``RemoveMostRelevantFirst`` / ``RemoveLeastRelevantFirst`` make them."""
    cam = torch.from_numpy(np.asarray(cam))
    return [perturbation(p, _keep_mask)(None, cam).numpy()
            for perturbation in (RemoveMostRelevantFirst, RemoveLeastRelevantFirst) for p in percentiles]


def imputed_images(x: torch.Tensor, masks: Sequence[np.ndarray], solver: str = "auto",
                   executor=None) -> Callable[[], torch.Tensor]:
    """Start the noisy linear imputation of the image ``x`` ``(1, C, H, W)`` for each of ``masks``; returns a
    function that waits for it and returns the images ``(M, C, H, W)`` on ``x``'s device, equal to
    :class:`FastNoisyLinearImputer` called mask after mask (its noise is drawn, in that order, by that function).
    ``solver``: ``"direct"`` (sparse LU, on ``executor``'s threads, or serially when it is None), ``"cg"``
    (:func:`impute_cg` on ``x``'s device), ``"auto"`` (``"cg"`` for CUDA tensors, else ``"direct"``)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    imputer = FastNoisyLinearImputer()
    if solver == "cg" or (solver == "auto" and x.is_cuda):
        image = x[0].detach()
        grids = impute_cg(image, torch.from_numpy(np.stack(masks)))
        solutions = []
        for grid, mask in zip(grids, masks):
            unknown = np.flatnonzero(mask.reshape(-1) == 0)
            solutions.append((grid.reshape(grid.shape[0], -1)[:, torch.from_numpy(unknown).to(grid.device)].t(),
                              unknown))
        return lambda: torch.stack([imputer.fill(image, *solution) for solution in solutions])
    image = x[0].detach().cpu()  # what grad-cam's PerturbationConfidenceMetric hands the imputer
    array = image.numpy()
    futures = [executor.submit(impute_linear, mask, array) for mask in masks] if executor is not None else None

    def finish() -> torch.Tensor:
        solutions = [f.result() for f in futures] if futures is not None else [impute_linear(m, array) for m in masks]
        return torch.stack([imputer.fill(image, *solution) for solution in solutions]).to(x.device)
    return finish


class TopRecorder:
    """A grad-cam target that records the top class of each output row it scores (for the answer change)."""

    def __init__(self, target: Callable) -> None:
        self.target, self.tops = target, []

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        self.tops.append(int(output.argmax()))
        return self.target(output)


def auc_images(x: torch.Tensor, order: np.ndarray, counts: Sequence[int], deletion_canvas: torch.Tensor,
               insertion_canvas: torch.Tensor, deletion_only: Sequence[int] = ()) -> torch.Tensor:
    """The inner images of the deletion curve (at each count ``c`` of ``counts``, the first ``c`` pixels of
    ``order`` replaced by the deletion canvas), then of the insertion curve (the same pixels of ``x`` on the
    insertion canvas), then deletion images at the counts ``deletion_only``: ``(2 len(counts) + len(deletion_only),
    C, H, W)``."""
    removed = removed_masks(order, list(counts) + list(deletion_only), tuple(x.shape[2:]), x.device)
    inner = removed[:len(counts)]
    return torch.stack([torch.where(r, deletion_canvas, x)[0] for r in inner]
                       + [torch.where(r, x, insertion_canvas)[0] for r in inner]
                       + [torch.where(r, deletion_canvas, x)[0] for r in removed[len(counts):]])


def auc(curve: Sequence[float]) -> float:
    """The area under a curve sampled at the removed shares ``0, 1/steps, ..., 1`` (trapezoid rule)."""
    values = np.asarray(curve, dtype=np.float64)
    return float((values[1:] + values[:-1]).sum() / (2 * (len(values) - 1)))


def normalised(area: float, clean: float, canvas_score: float) -> float:
    """``(AUC - canvas score) / (clean score - canvas score)``: 0 at the canvas's score, 1 at the clean image's."""
    return (area - canvas_score) / (clean - canvas_score)


@dataclass
class PerturbationScores:
    """One map's scores: ROAD's change of the target logit at each percentile (MoRF, LeRF); the deletion and
    insertion curves at the removed ``shares`` (``0 .. 1``); the share of the target's probability each canvas keeps
    (``kept_deletion``, ``kept_insertion``); the top answer at each point of the deletion curve (``deletion_tops``)
    and on the clean image (``answer``); whether removing the map's top 10 % changes it."""

    morf: List[float]
    lerf: List[float]
    deletion: List[float]
    insertion: List[float]
    shares: List[float]
    kept_deletion: float
    kept_insertion: float
    deletion_tops: List[int]
    answer: int
    top_share_changed: bool

    @property
    def deletion_auc(self) -> float:
        return auc(self.deletion)

    @property
    def insertion_auc(self) -> float:
        return auc(self.insertion)

    @property
    def saturated(self) -> bool:
        """A canvas keeps :data:`SATURATION` or more of the target's probability: its curve says little."""
        return max(self.kept_deletion, self.kept_insertion) >= SATURATION

    @property
    def deletion_auc_norm(self) -> Optional[float]:
        """The deletion AUC from the deletion canvas's score (0) to the clean image's (1); None when saturated."""
        if self.kept_deletion >= SATURATION:
            return None
        return normalised(self.deletion_auc, self.deletion[0], self.deletion[-1])

    @property
    def insertion_auc_norm(self) -> Optional[float]:
        """The insertion AUC from the insertion canvas's score (0) to the clean image's (1); None when saturated."""
        if self.kept_insertion >= SATURATION:
            return None
        return normalised(self.insertion_auc, self.insertion[-1], self.insertion[0])

    @property
    def answer_change(self) -> Optional[float]:
        """The share removed when the top answer first changes along the deletion curve (None: never)."""
        return first_change(self.deletion_tops[1:], self.shares[1:], self.answer)


class PerturbationScorer:
    """ROAD and the deletion / insertion AUC of maps of one image ``x`` ``(1, C, H, W)`` and target class
    ``category`` on ``model`` (a wrapper), under the deletion / insertion ``protocol``
    (:class:`~pytorch_grad_cam_vlm.metrics.auc_protocols.AUCProtocol`); the clean image and the canvases scored
    once (see the module); ``batch_size`` None: :func:`auto_batch_size`."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, category: int, percentiles: Sequence[float],
                 protocol: AUCProtocol = PROTOCOLS["black"], score: str = "probability",
                 batch_size: Optional[int] = None, solver: str = "auto", executor=None) -> None:
        if score not in AUC_SCORES:
            raise ValueError(f"score must be one of {AUC_SCORES}, got {score!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
        self.model, self.x, self.percentiles, self.protocol = model, x.detach(), list(percentiles), protocol
        self.batch_size = batch_size or auto_batch_size(x)
        self.solver, self.executor = solver, executor
        self.logit = ClassifierOutputTarget(category)
        self.probability = ProbabilityTarget(category)
        self.curve_target = self.probability if score == "probability" else self.logit
        mean, std = getattr(model, "image_mean", None), getattr(model, "image_std", None)
        self.deletion_canvas = canvas(self.x, protocol.deletion_canvas, mean, std)
        self.insertion_canvas = self.deletion_canvas if protocol.insertion_canvas == protocol.deletion_canvas \
            else canvas(self.x, protocol.insertion_canvas, mean, std)
        n = self.x.shape[2] * self.x.shape[3]
        self.counts = protocol.counts(*self.x.shape[2:])
        self.shares = [c / n for c in self.counts]
        self.top_count = top_share_count(n)
        with torch.no_grad():
            clean, deletion, insertion = model(torch.cat([self.x, self.deletion_canvas, self.insertion_canvas]))
        self.clean_logit = np.float32(self.logit(clean).cpu().numpy())
        self.answer, self.canvas_top = int(clean.argmax()), int(deletion.argmax())
        self.clean_score, self.deletion_score, self.insertion_score = (float(self.curve_target(o)) for o in
                                                                        (clean, deletion, insertion))
        clean_probability = float(self.probability(clean))
        self.kept = [float(self.probability(o)) / clean_probability if clean_probability > 0 else 1.0
                     for o in (deletion, insertion)]

    def __call__(self, road_map: np.ndarray, order: np.ndarray) -> PerturbationScores:
        """The scores of one map: ROAD on ``road_map`` (the ranked map, or the map itself for grad-cam's
        thresholds), the AUC curves removing pixels in ``order`` (flat indices, the most relevant first:
        :func:`~pytorch_grad_cam_vlm.metrics.auc_protocols.removal_order`)."""
        return self.start(road_map, order)()

    def start(self, road_map: np.ndarray, order: np.ndarray) -> Callable[[], PerturbationScores]:
        """:meth:`__call__` in two halves, so that a caller can work while the imputation runs: this one starts the
        imputation (on the executor's threads) and scores the deletion / insertion images; the function it returns
        waits for the imputation, draws the imputer's noise from torch's generator as it then stands, scores ROAD's
        images and returns the scores."""
        finish = imputed_images(self.x, road_masks(road_map, self.percentiles), self.solver, self.executor)
        inner = self.counts[1:-1]
        extra = [] if self.top_count in self.counts else [self.top_count]  # the map's top 10 % removed
        recorder = TopRecorder(self.curve_target)
        curves = target_scores(self.model, auc_images(self.x, order, inner, self.deletion_canvas,
                                                      self.insertion_canvas, extra), recorder, self.batch_size)
        k = len(inner)
        tops = [self.answer] + recorder.tops[:k] + [self.canvas_top]
        top_changed = (recorder.tops[2 * k] if extra else tops[self.counts.index(self.top_count)]) != self.answer

        def scores() -> PerturbationScores:
            road = target_scores(self.model, finish(), self.logit, self.batch_size) - self.clean_logit
            n = len(self.percentiles)
            return PerturbationScores(
                list(road[:n]), list(road[n:]),
                [self.clean_score] + [float(v) for v in curves[:k]] + [self.deletion_score],
                [self.insertion_score] + [float(v) for v in curves[k:2 * k]] + [self.clean_score],
                self.shares, self.kept[0], self.kept[1], tops, self.answer, top_changed)
        return scores


def make_executor(threads: Optional[int]):
    """A thread pool for the imputation, or None (serial) for ``threads`` <= 1."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads, thread_name_prefix="road-imputation") if threads and threads > 1 else None
