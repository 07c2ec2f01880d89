"""ROAD's noisy linear imputation solved by batched conjugate gradients in torch, for maps on the GPU.

The imputation system of :func:`pytorch_grad_cam_vlm.metrics.road.sparse_system` is, for each removed pixel ``i``,

    degree_i * v_i - sum over removed neighbours j of w_ij * v_j = sum over kept neighbours j of w_ij * image_j

with grad-cam's 8-neighbour weights ``w`` (1/6 beside, 1/12 diagonal) and ``degree_i`` the sum of the weights of
``i``'s neighbours inside the image. The matrix is symmetric and (weakly, irreducibly: every connected group of
removed pixels touches a kept pixel or loses weight at the border) diagonally dominant, hence positive definite, so
conjugate gradients converge. Here the matrix is never built: it is applied as a 3x3 stencil on the pixel grid,
masked to the removed pixels, and every mask x channel is one system of the batch, solved together.

Plain (Jacobi-preconditioned) conjugate gradients need about as many iterations as the widest removed region is
wide: ~200 at 448x448 when the kept pixels are scattered, 1000-3000 when a smooth map removes one large blob, as ROAD
does at its high percentiles. So the preconditioner is a geometric multigrid V-cycle: the same stencil on grids
halved down to :data:`COARSEST` pixels (a coarse pixel is removed when all its children are; residuals restricted by
summing the children, corrections prolonged by copying), with :data:`SMOOTHING` weighted-Jacobi sweeps before and
after each coarse correction (the same count both ways, so the preconditioner is symmetric, as conjugate gradients
need). The iteration count then hardly grows with the region's size (``benchmarks/bench_benchmark.py --cg``).
On CUDA this replaces the sparse LU factorisations of the CPU path; it runs on the CPU too (``solver="cg"``), which
is how the tests compare it with the direct solver.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from pytorch_grad_cam.metrics.road import neighbors_weights

CG_TOLERANCE = 1e-10  # relative residual of every system at which the iteration stops
COARSEST = 8  # the V-cycle's coarsest grid side, solved there by COARSE_SWEEPS Jacobi sweeps
COARSE_SWEEPS = 20
SMOOTHING = 2  # Jacobi sweeps before and after each coarse-grid correction
JACOBI_WEIGHT = 0.8

Weighting = Sequence[Tuple[Tuple[int, int], float]]


def _neighbour_sum(v: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """For each pixel of ``v`` ``(..., H, W)``, the weighted sum of its in-image neighbours: shifted slices of the
    zero-padded grid (elementwise work, fast in float64 on any device, where a float64 convolution is not)."""
    height, width = v.shape[-2:]
    padded = F.pad(v, (1, 1, 1, 1))
    total = torch.zeros_like(v)
    for (dy, dx), weight in weighting:
        total.add_(padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width], alpha=weight)
    return total


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(-2, -1), keepdim=True)


class _Grid:
    """The system's operator on one grid of the hierarchy: its removed pixels ``(M, 1, h, w)`` and their degrees."""

    def __init__(self, removed: torch.Tensor, weighting: Weighting) -> None:
        self.removed, self.weighting = removed, weighting
        ones = torch.ones(1, 1, *removed.shape[-2:], dtype=removed.dtype, device=removed.device)
        self.degree = _neighbour_sum(ones, weighting)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return self.removed * (self.degree * v - _neighbour_sum(v, self.weighting))

    def jacobi(self, e: torch.Tensor, r: torch.Tensor, sweeps: int) -> torch.Tensor:
        for _ in range(sweeps):
            e = e + JACOBI_WEIGHT * (r - self.apply(e)) / self.degree
        return e

    def coarser(self) -> "_Grid":
        height, width = self.removed.shape[-2:]
        padded = F.pad(self.removed, (0, width % 2, 0, height % 2), value=1.0)
        return _Grid(-F.max_pool2d(-padded, 2), self.weighting)  # removed when all four children are


def _hierarchy(removed: torch.Tensor, weighting: Weighting) -> List[_Grid]:
    grids = [_Grid(removed, weighting)]
    while min(grids[-1].removed.shape[-2:]) > COARSEST:
        grids.append(grids[-1].coarser())
    return grids


def _v_cycle(grids: List[_Grid], r: torch.Tensor, level: int = 0) -> torch.Tensor:
    """An approximate solution of ``grids[level]``'s system for the residual ``r`` (zero at kept pixels)."""
    grid = grids[level]
    if level == len(grids) - 1:
        return grid.jacobi(torch.zeros_like(r), r, COARSE_SWEEPS)
    e = grid.jacobi(torch.zeros_like(r), r, SMOOTHING)
    residual = r - grid.apply(e)
    height, width = r.shape[-2:]
    residual = F.pad(residual, (0, width % 2, 0, height % 2))
    coarse = grids[level + 1].removed * 4 * F.avg_pool2d(residual, 2)  # the sum of the four children
    correction = _v_cycle(grids, coarse, level + 1)
    e = e + grid.removed * correction.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :height, :width]
    return grid.jacobi(e, r, SMOOTHING)


def impute_cg(img: torch.Tensor, masks: torch.Tensor, weighting: Weighting = neighbors_weights,
              tol: float = CG_TOLERANCE, max_iter: Optional[int] = None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The noise-free linear imputation of ``img`` ``(C, H, W)`` for each of ``masks`` ``(M, H, W)`` (1 keeps a
    pixel, 0 imputes it), on ``img``'s device: ``(M, C, H, W)`` in ``dtype``, kept pixels as they are, removed ones
    solved to a relative residual of ``tol`` (at most ``max_iter`` iterations, default ``H + W``)."""
    channels, height, width = img.shape
    removed = (masks.to(img.device) < 0.5).to(dtype)[:, None]  # (M, 1, H, W)
    image = img.to(dtype)[None]  # (1, C, H, W)
    grids = _hierarchy(removed, weighting)
    rhs = removed * _neighbour_sum((1 - removed) * image, weighting)  # (M, C, H, W)

    v = torch.zeros_like(rhs)
    r = rhs.clone()
    z = _v_cycle(grids, r)
    p = z.clone()
    rz = _dot(r, z)
    stop = tol * torch.sqrt(_dot(rhs, rhs))
    tiny = torch.finfo(dtype).tiny
    for _ in range(max_iter or height + width):
        q = grids[0].apply(p)
        pq = _dot(p, q)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(tiny), torch.zeros_like(pq))
        v += alpha * p
        r -= alpha * q
        if bool((torch.sqrt(_dot(r, r)) <= stop).all()):
            break
        z = _v_cycle(grids, r)
        rz_next = _dot(r, z)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_next
    return removed * v + (1 - removed) * image
