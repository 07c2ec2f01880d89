"""The model-parameter randomization sanity check (Adebayo et al. 2018): a map that depends on what the model learned
changes when the model's weights are re-initialised."""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps' pixels (average ranks for ties); NaN when either map is flat."""
    from scipy.stats import rankdata

    ra, rb = rankdata(np.ravel(a)), rankdata(np.ravel(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def randomized_copy(model: torch.nn.Module, layers: Sequence[torch.nn.Module], seed: int) -> torch.nn.Module:
    """The sanity check's model: a deep copy of ``model`` whose ``layers`` (Qwen: the decoder layers; CLIP: the
    vision layers) and output embeddings (``lm_head``, where there is one) are re-initialised as the config
    initialises a fresh model (linear weights ``N(0, initializer_range)``, biases 0, norm weights 1), from a
    generator seeded with ``seed``. Everything else keeps its trained weights (Qwen's token embeddings too, unless
    the model ties them to ``lm_head``, as Qwen2.5-VL-3B does)."""
    names = [name for name, module in model.named_modules() if any(module is layer for layer in layers)]
    randomized = copy.deepcopy(model)
    config = getattr(randomized.config, "text_config", randomized.config)
    std = getattr(config, "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = randomized.get_output_embeddings()  # None for CLIP models
        for module in [randomized.get_submodule(name) for name in names] + ([head] if head is not None else []):
            for name, parameter in module.named_parameters():
                if parameter.dim() >= 2:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
                elif name.endswith("bias"):
                    parameter.zero_()
                else:
                    parameter.fill_(1.0)
    return randomized
