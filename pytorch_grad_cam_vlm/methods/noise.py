"""The noise of the Smooth methods: i.i.d. normals, and variance-reduced kinds (antithetic pairs, scrambled Sobol
points and Latin hypercube strata mapped through the normal inverse CDF) that reach the same smoothed map with fewer
copies (benchmarks/bench_smooth_convergence.py)."""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch.quasirandom import SobolEngine


# Sobol dimensions the elements of an input share (SobolEngine takes up to 21201). Measured with
# benchmarks/bench_smooth_convergence.py --sobol-dimension 21201 on the demo and a random Qwen2.5-VL (10 images, 5
# seeds): L2 errors at n = 64 of 0.0042 and 0.0356 against 0.0035 and 0.0325 with 1024, no better, for an engine
# that takes 0.6 s per input to build against 0.03 s.
SOBOL_MAX_DIMENSION = 1024


_SOBOL_BITS = SobolEngine.MAXBIT  # 30: scrambled Sobol coordinates are whole multiples of 2 ** -30


_LATIN_BLOCK = 1 << 22  # random keys sorted at a time when drawing Latin hypercube strata (32 MiB of float64)


NoiseStream = Callable[[int, Tuple[int, ...], Optional[torch.Generator]], Iterator[torch.Tensor]]


def _iid_noise(n: int, shape: Tuple[int, ...], generator: Optional[torch.Generator]) -> Iterator[torch.Tensor]:
    """``n`` independent ``randn(shape)`` draws, one after the other (SmoothGrad's noise before ``noise=``)."""
    for _ in range(n):
        yield torch.randn(shape, generator=generator)


def _antithetic_noise(n: int, shape: Tuple[int, ...],
                      generator: Optional[torch.Generator]) -> Iterator[torch.Tensor]:
    """Pairs ``e, -e`` of ``randn(shape)`` draws; with an odd ``n`` the last copy is an unpaired ``randn`` draw
    (the first half of the pair that ``n + 1`` copies would complete)."""
    for _ in range(n // 2):
        draw = torch.randn(shape, generator=generator)
        yield draw
        yield -draw
    if n % 2:
        yield torch.randn(shape, generator=generator)


def _sobol_noise(n: int, shape: Tuple[int, ...], generator: Optional[torch.Generator]) -> Iterator[torch.Tensor]:
    """Scrambled Sobol points mapped through the normal inverse CDF, one point per copy.

    The input's ``m`` elements (pixels times channels) share ``d = min(m, SOBOL_MAX_DIMENSION)`` Sobol dimensions:
    element ``j`` reads dimension ``perm[j] % d`` of a random permutation ``perm``, so each dimension serves about
    ``m / d`` elements, scattered over the image; and each element XORs its 30-bit coordinate with its own random
    digital shift. The shift keeps each element's ``n = 2 ** k`` values a (0, k, 1)-net (one value in each of ``n``
    equal-probability strata) and makes each copy on its own exactly uniform: every copy's noise is ``N(0, I)``,
    so the mean over the copies stays an unbiased estimate of SmoothGrad's expectation. Elements sharing a dimension
    are uncorrelated over the shifts but not independent within a draw. Coordinates are taken at the centre of
    their 2 ** -30 cell, so the inverse CDF stays finite (at most 6.2 in absolute value).
    """
    size = math.prod(shape)
    dimension = min(size, SOBOL_MAX_DIMENSION)
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    element_dimension = torch.randperm(size, generator=generator) % dimension
    shift = torch.randint(2 ** _SOBOL_BITS, (size,), generator=generator)
    engine = SobolEngine(dimension, scramble=True, seed=seed)
    for _ in range(n):
        bits = torch.round(engine.draw(1, dtype=torch.float64)[0] * 2 ** _SOBOL_BITS).long()
        uniform = ((bits[element_dimension] ^ shift).double() + 0.5) / 2 ** _SOBOL_BITS
        yield torch.special.ndtri(uniform).float().view(shape)


def _latin_noise(n: int, shape: Tuple[int, ...], generator: Optional[torch.Generator]) -> Iterator[torch.Tensor]:
    """Latin hypercube sampling per element: over the ``n`` copies each element takes one value in each of ``n``
    equal-probability strata of ``N(0, 1)``, the strata in an independent random order per element, the value
    uniform within its stratum. Each copy on its own is exactly ``N(0, I)`` (up to a clamp at 8.2 standard
    deviations). The strata of all copies are drawn first (``n x elements`` small integers)."""
    size = math.prod(shape)
    block = max(1, _LATIN_BLOCK // n)
    strata = torch.cat([torch.rand(n, min(block, size - start), generator=generator, dtype=torch.float64)
                        .argsort(dim=0).to(torch.int16 if n <= 2 ** 15 else torch.int32)
                        for start in range(0, size, block)], dim=1)
    for stratum in strata:
        uniform = (stratum + torch.rand(size, generator=generator, dtype=torch.float64)) / n
        yield torch.special.ndtri(uniform.clamp_(2.0 ** -53, 1 - 2.0 ** -53)).float().view(shape)


NOISE_STREAMS: Dict[str, NoiseStream] = {"iid": _iid_noise, "antithetic": _antithetic_noise, "sobol": _sobol_noise,
                                         "latin": _latin_noise}


NOISE_KINDS = tuple(NOISE_STREAMS)


def noise_stream(kind: str, n: int, shape: Sequence[int],
                 generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """The standard-normal noise of ``n`` copies of one input of ``shape``, copy after copy (float32, CPU), drawn
    from ``generator`` (``None``: torch's global generator) when the copies are reached."""
    if kind not in NOISE_STREAMS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}.")
    return NOISE_STREAMS[kind](n, tuple(shape), generator)


def noise_draws(kind: str, n: int, shape: Sequence[int],
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The noise of ``noise_stream`` as one ``(n, *shape)`` tensor: copy ``s`` of an input ``x`` is
    ``x + noise_level * (x.max() - x.min()) * noise_draws(...)[s]``."""
    return torch.stack(list(noise_stream(kind, n, shape, generator)))
