"""ROAD's noisy linear imputation solved by batched conjugate gradients in torch, for maps on the GPU.

The imputation system of :func:`pytorch_grad_cam_vlm.metrics.road.sparse_system` is, for each removed pixel ``i``,

    degree_i * v_i - sum over removed neighbours j of w_ij * v_j = sum over kept neighbours j of w_ij * image_j

with grad-cam's 8-neighbour weights ``w`` (1/6 beside, 1/12 diagonal) and ``degree_i`` the sum of the weights of
``i``'s neighbours inside the image. The matrix is symmetric and (weakly, irreducibly: every connected group of
removed pixels touches a kept pixel or loses weight at the border) diagonally dominant, hence positive definite, so
conjugate gradients converge. Here the matrix is never built: it is applied as a 3x3 convolution on the pixel grid,
masked to the removed pixels, and every mask x channel is one system of the batch, solved together with a Jacobi
(``1 / degree``) preconditioner. On CUDA this replaces the sparse LU factorisations of the CPU path; it runs on the
CPU too (``solver="cg"``), which is how the tests compare it with the direct solver.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from pytorch_grad_cam.metrics.road import neighbors_weights

CG_TOLERANCE = 1e-10  # relative residual of every system at which the iteration stops


def _neighbour_sum(v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """For each pixel of ``v`` ``(..., H, W)``, the weighted sum of its in-image neighbours."""
    shape = v.shape
    flat = v.reshape(-1, 1, *shape[-2:])
    return torch.nn.functional.conv2d(flat, kernel, padding=1).reshape(shape)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(-2, -1), keepdim=True)


def impute_cg(img: torch.Tensor, masks: torch.Tensor,
              weighting: Sequence[Tuple[Tuple[int, int], float]] = neighbors_weights,
              tol: float = CG_TOLERANCE, max_iter: Optional[int] = None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The noise-free linear imputation of ``img`` ``(C, H, W)`` for each of ``masks`` ``(M, H, W)`` (1 keeps a
    pixel, 0 imputes it), on ``img``'s device: ``(M, C, H, W)`` in ``dtype``, kept pixels as they are, removed ones
    solved to a relative residual of ``tol`` (at most ``max_iter`` iterations, default ``10 * (H + W)``)."""
    channels, height, width = img.shape
    kernel = torch.zeros(1, 1, 3, 3, dtype=dtype, device=img.device)
    for (dy, dx), weight in weighting:
        kernel[0, 0, 1 + dy, 1 + dx] = weight  # conv2d correlates: the neighbour at (dy, dx) gets this weight
    removed = (masks.to(img.device) < 0.5).to(dtype)[:, None]  # (M, 1, H, W)
    image = img.to(dtype)[None]  # (1, C, H, W)
    degree = _neighbour_sum(torch.ones(1, 1, height, width, dtype=dtype, device=img.device), kernel)
    rhs = removed * _neighbour_sum((1 - removed) * image, kernel)  # (M, C, H, W)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return removed * (degree * v - _neighbour_sum(v, kernel))

    v = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r / degree
    p = z.clone()
    rz = _dot(r, z)
    stop = tol * torch.sqrt(_dot(rhs, rhs))
    for iteration in range(max_iter or 10 * (height + width)):
        q = apply(p)
        pq = _dot(p, q)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(pq))
        v += alpha * p
        r -= alpha * q
        if iteration % 10 == 9 and bool((torch.sqrt(_dot(r, r)) <= stop).all()):
            break
        z = r / degree
        rz_next = _dot(r, z)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_next
    return removed * v + (1 - removed) * image
