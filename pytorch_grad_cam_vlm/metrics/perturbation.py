"""The perturbation metrics of a map, batched: ROAD and the deletion / insertion AUC of one image and target.

ROAD (Rong et al. 2022): the image with the most (MoRF) or least (LeRF) relevant pixels removed at each percentile
``p`` and imputed, scored on the target's logit minus the clean image's. The masks are made by grad-cam's own
``RemoveMostRelevantFirst`` / ``RemoveLeastRelevantFirst`` and imputed by
:class:`~pytorch_grad_cam_vlm.metrics.road.FastNoisyLinearImputer`, so a row equals grad-cam's
``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst`` with that imputer, called percentile after percentile (MoRF
then LeRF) from the same torch seed: the systems are solved first, all at once, and the imputer's noise is drawn
afterwards in grad-cam's order.

Deletion and insertion (Petsiuk et al. 2018, RISE; as EAGLE reports them): in :data:`AUC_STEPS` steps, step ``k``
takes the ``floor(k * N / steps)`` most relevant of the ``N`` pixels, in the order of the ranked map (ties broken by
:func:`~pytorch_grad_cam_vlm.metrics.deletion_check.ranked_map`). Deletion replaces them with the baseline (lower
AUC is better); insertion starts from the baseline and puts them back (higher is better). The baseline is the image
blurred by a Gaussian of 8 pixels (``"blur"``, RISE's insertion canvas) or the processor's mean colour (``"mean"``,
0 once normalised), both from :func:`~pytorch_grad_cam_vlm.metrics.deletion_check.filled`. The curve is the
target's softmax probability (``"probability"``, as RISE and EAGLE report it; in [0, 1]) or its logit; the AUC is
the trapezoid rule over the removed share 0..1 (``steps + 1`` points). The end points, the clean image and the
baseline, are scored once per image, not once per map.

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

from pytorch_grad_cam_vlm.metrics.deletion_check import FILLS, auto_batch_size, filled, target_scores
from pytorch_grad_cam_vlm.metrics.road import FastNoisyLinearImputer, impute_linear
from pytorch_grad_cam_vlm.metrics.road_cg import impute_cg

AUC_STEPS = 20
AUC_BASELINES = FILLS
AUC_SCORES = ("probability", "logit")
SOLVERS = ("auto", "direct", "cg")
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


def removal_order(ranks: np.ndarray) -> np.ndarray:
    """Each pixel's place in the removal order of a ranked map (0: the highest rank, removed first)."""
    order = np.argsort(-np.ravel(ranks), kind="stable")
    place = np.empty(order.size, dtype=np.int64)
    place[order] = np.arange(order.size)
    return place.reshape(np.shape(ranks))


def auc_images(x: torch.Tensor, ranks: np.ndarray, background: torch.Tensor, steps: int = AUC_STEPS
               ) -> torch.Tensor:
    """The inner images of the deletion curve (steps ``1 .. steps - 1``: the most relevant ``floor(k N / steps)``
    pixels replaced by ``background``), then of the insertion curve (the same pixels of ``x`` on the background):
    ``(2 (steps - 1), C, H, W)``."""
    place = torch.from_numpy(removal_order(ranks)).to(x.device)
    removed = [place < (k * place.numel()) // steps for k in range(1, steps)]
    return torch.stack([torch.where(r, background, x)[0] for r in removed]
                       + [torch.where(r, x, background)[0] for r in removed])


def auc(curve: Sequence[float]) -> float:
    """The area under a curve sampled at the removed shares ``0, 1/steps, ..., 1`` (trapezoid rule)."""
    values = np.asarray(curve, dtype=np.float64)
    return float((values[1:] + values[:-1]).sum() / (2 * (len(values) - 1)))


@dataclass
class PerturbationScores:
    """One map's scores: ROAD's change of the target logit at each percentile (MoRF, LeRF), and the deletion and
    insertion curves at the removed shares ``0 .. 1``."""

    morf: List[float]
    lerf: List[float]
    deletion: List[float]
    insertion: List[float]

    @property
    def deletion_auc(self) -> float:
        return auc(self.deletion)

    @property
    def insertion_auc(self) -> float:
        return auc(self.insertion)


class PerturbationScorer:
    """ROAD and the deletion / insertion AUC of maps of one image ``x`` ``(1, C, H, W)`` and target class
    ``category`` on ``model`` (a wrapper), the clean image and the baseline scored once (see the module);
    ``batch_size`` None: :func:`auto_batch_size`."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, category: int, percentiles: Sequence[float],
                 steps: int = AUC_STEPS, baseline: str = "blur", score: str = "probability",
                 batch_size: Optional[int] = None, solver: str = "auto", executor=None) -> None:
        if score not in AUC_SCORES:
            raise ValueError(f"score must be one of {AUC_SCORES}, got {score!r}.")
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be a whole number >= 2, got {steps!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
        self.model, self.x, self.percentiles, self.steps = model, x.detach(), list(percentiles), steps
        self.batch_size = batch_size or auto_batch_size(x)
        self.solver, self.executor = solver, executor
        self.logit = ClassifierOutputTarget(category)
        self.curve_target = ProbabilityTarget(category) if score == "probability" else self.logit
        self.background = filled(self.x, baseline)
        with torch.no_grad():
            clean, background = model(self.x)[0], model(self.background)[0]
        self.clean_logit = np.float32(self.logit(clean).cpu().numpy())
        self.clean_score, self.background_score = (float(self.curve_target(o)) for o in (clean, background))

    def __call__(self, road_map: np.ndarray, ranks: np.ndarray) -> PerturbationScores:
        """The scores of one map: ROAD on ``road_map`` (the ranked map, or the map itself for grad-cam's
        thresholds), the AUC curves in the order of ``ranks`` (a ranked map: distinct values)."""
        return self.start(road_map, ranks)()

    def start(self, road_map: np.ndarray, ranks: np.ndarray) -> Callable[[], PerturbationScores]:
        """:meth:`__call__` in two halves, so that a caller can work while the imputation runs: this one starts the
        imputation (on the executor's threads) and scores the deletion / insertion images; the function it returns
        waits for the imputation, draws the imputer's noise from torch's generator as it then stands, scores ROAD's
        images and returns the scores."""
        finish = imputed_images(self.x, road_masks(road_map, self.percentiles), self.solver, self.executor)
        curves = target_scores(self.model, auc_images(self.x, ranks, self.background, self.steps), self.curve_target,
                               self.batch_size)

        def scores() -> PerturbationScores:
            road = target_scores(self.model, finish(), self.logit, self.batch_size) - self.clean_logit
            n, inner = len(self.percentiles), self.steps - 1
            return PerturbationScores(
                list(road[:n]), list(road[n:]),
                [self.clean_score] + [float(v) for v in curves[:inner]] + [self.background_score],
                [self.background_score] + [float(v) for v in curves[inner:]] + [self.clean_score])
        return scores


def make_executor(threads: Optional[int]):
    """A thread pool for the imputation, or None (serial) for ``threads`` <= 1."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads, thread_name_prefix="road-imputation") if threads and threads > 1 else None
