"""The smallest region that changes the answer (as EAGLE's minimal region and its CSR@10 %): remove a map's pixels in
its order, most relevant first, onto the deletion canvas, and find the share removed when the model's top answer
first differs from its answer on the clean image; and whether removing the map's top 10 % already changes it.

A map that points at what the model used changes the answer after a small share; a map that points elsewhere needs
most of the image removed, or never changes it (``None``: the answer holds even on the whole canvas, as where the
model gives the same answer for a blank image; ``benchmarks/auc_canvas.md``). The share is read at the protocol's
steps (5 % for the default), so it is an upper bound within one step of the exact smallest share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from pytorch_grad_cam_vlm.metrics.auc_protocols import DEFAULT_PROTOCOL, canvas, protocol, removal_order, removed_masks
from pytorch_grad_cam_vlm.metrics.deletion_check import auto_batch_size, ranked_map

TOP_SHARE = 0.1  # CSR@10 %: the share of the map's top pixels removed


@dataclass
class AnswerChange:
    """``share``: the share of pixels removed when the top answer first changes (``None``: it never does);
    ``top_share_changed``: whether removing the map's top :data:`TOP_SHARE` changes it."""

    share: Optional[float]
    top_share_changed: bool


def first_change(tops: Sequence[int], shares: Sequence[float], answer: int) -> Optional[float]:
    """The first of ``shares`` whose top answer (``tops``, same order) is not ``answer``; ``None`` if none."""
    return next((float(share) for top, share in zip(tops, shares) if top != answer), None)


def top_share_count(n_pixels: int) -> int:
    """The pixels removed for :data:`TOP_SHARE` of ``n_pixels``."""
    return int(n_pixels * TOP_SHARE)


def answer_change(model: torch.nn.Module, x: torch.Tensor, cam: np.ndarray, protocol_name: str = DEFAULT_PROTOCOL,
                  batch_size: Optional[int] = None, seed: int = 0) -> AnswerChange:
    """:class:`AnswerChange` of the map ``cam`` ``(H, W)`` of one image ``x`` ``(1, 3, H, W)`` on ``model`` (a
    wrapper whose output rows are scores over answers), removing pixels onto the deletion canvas of the protocol
    ``protocol_name`` (:data:`~pytorch_grad_cam_vlm.metrics.auc_protocols.PROTOCOLS`) at its steps; ties among equal
    map values as the protocol orders them (random ones seeded by ``seed``). ``2 + steps`` images go through the
    model, in batches of ``batch_size`` (None: :func:`auto_batch_size`)."""
    chosen = protocol(protocol_name)
    height, width = cam.shape
    ranks = ranked_map(cam, np.random.default_rng(seed)) if chosen.tie_order == "random" else None
    order = removal_order(cam, chosen.tie_order, ranks)
    counts = chosen.counts(height, width)[1:] + [top_share_count(height * width)]
    background = canvas(x.detach(), chosen.deletion_canvas, getattr(model, "image_mean", None),
                        getattr(model, "image_std", None))
    images = torch.stack([x[0].detach()] + [torch.where(m, background, x.detach())[0]
                                            for m in removed_masks(order, counts, (height, width), x.device)])
    batch_size = batch_size or auto_batch_size(x)
    tops = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            tops += model(images[start:start + batch_size]).argmax(-1).tolist()
    shares = [c / (height * width) for c in counts[:-1]]
    return AnswerChange(first_change(tops[1:-1], shares, tops[0]), tops[-1] != tops[0])
