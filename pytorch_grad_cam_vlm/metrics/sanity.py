"""The model-parameter randomization sanity check (Adebayo et al. 2018): a map that depends on what the model learned
changes when the model's weights are re-initialised.

Two forms: *independent* (:func:`randomized_copy` of the decoder layers and ``lm_head`` at once: the vision tower
keeps its weights) and *cascading*, Adebayo et al.'s standard form (:func:`cascade_modules`: from the output down,
``lm_head``, the decoder layers last block first, the projector, then the vision tower's blocks last first; each
stage keeps the earlier stages randomised, :func:`cascading_copies`). The benchmark reports the cascade's last stage,
every listed module re-initialised (``sanity_cascade``)."""
from __future__ import annotations

import copy
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps' pixel values; NaN when either map is flat."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps' pixels (average ranks for ties); NaN when either map is flat."""
    from scipy.stats import rankdata

    return pearson(rankdata(np.ravel(a)), rankdata(np.ravel(b)))


def cascade_modules(wrapper) -> List[torch.nn.Module]:
    """The modules of the cascading randomisation of ``wrapper``'s model below ``lm_head``, top first: the decoder
    layers (CLIP: the vision layers) last first, the projector, the vision tower's blocks last first (those the
    wrapper has)."""
    from pytorch_grad_cam_vlm.layers import has_projector

    modules = list(reversed(wrapper.layers))
    if has_projector(wrapper):
        modules.append(wrapper.projector)
    return modules + list(reversed(getattr(wrapper, "vision_blocks", [])))


def cascading_copies(model: torch.nn.Module, modules: Sequence[torch.nn.Module], seed: int
                     ) -> Iterator[Tuple[int, torch.nn.Module]]:
    """The cascade's stages: ``(k, copy)`` with ``lm_head`` and the first ``k`` of ``modules``
    (:func:`cascade_modules`) re-initialised, for ``k = 1 .. len(modules)``; each stage re-initialises the next
    module of the same copy (seeded by ``seed`` and ``k``), so earlier stages stay as they were drawn."""
    names = [name for name, module in model.named_modules() if any(module is m for m in modules)]
    order = sorted(names, key=lambda name: next(i for i, m in enumerate(modules) if m is model.get_submodule(name)))
    copy_ = randomized_copy(model, [], seed)
    for k, name in enumerate(order, 1):
        _reinitialise([copy_.get_submodule(name)], _init_std(copy_), torch.Generator().manual_seed(seed * 100003 + k))
        yield k, copy_


def _init_std(model: torch.nn.Module) -> float:
    config = getattr(model.config, "text_config", model.config)
    return getattr(config, "initializer_range", 0.02)


def _reinitialise(modules: Sequence[torch.nn.Module], std: float, generator: torch.Generator) -> None:
    """Linear weights ``N(0, std)``, biases 0, norm weights 1, as a config initialises a fresh model."""
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                if parameter.dim() >= 2:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
                elif name.endswith("bias"):
                    parameter.zero_()
                else:
                    parameter.fill_(1.0)


def randomized_copy(model: torch.nn.Module, layers: Sequence[torch.nn.Module], seed: int) -> torch.nn.Module:
    """The sanity check's model: a deep copy of ``model`` whose ``layers`` (Qwen: the decoder layers; CLIP: the
    vision layers) and output embeddings (``lm_head``, where there is one) are re-initialised as the config
    initialises a fresh model (linear weights ``N(0, initializer_range)``, biases 0, norm weights 1), from a
    generator seeded with ``seed``. Everything else keeps its trained weights (Qwen's token embeddings too, unless
    the model ties them to ``lm_head``, as Qwen2.5-VL-3B does)."""
    names = [name for name, module in model.named_modules() if any(module is layer for layer in layers)]
    randomized = copy.deepcopy(model)
    head = randomized.get_output_embeddings()  # None for CLIP models
    _reinitialise([randomized.get_submodule(name) for name in names] + ([head] if head is not None else []),
                  _init_std(randomized), torch.Generator().manual_seed(seed))
    return randomized
