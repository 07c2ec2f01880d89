"""grad-cam targets for a vision-language model's words and answers.

A target is called on one row of the wrapper's output: next-token logits ``(vocab,)``, or, with an answer set on the
wrapper, the answer's score ``(1,)``. Each target checks which of the two it got, so that a target meant for the other
mode raises a clear error instead of drawing a map of something else.
"""
from __future__ import annotations

import torch

def _next_token_logits(model_output: torch.Tensor, target: str, *token_ids: int) -> torch.Tensor:
    """The output, checked to be next-token logits that hold ``token_ids`` (a ValueError, not grad-cam's swallowed
    IndexError)."""
    if model_output.shape[-1] == 1:
        raise ValueError(f"{target} scores next-token logits, but the wrapper returns an answer score (an answer is "
                         "set): use targets=None or AnswerTarget(), or wrapper.set_answer(None).")
    outside = [t for t in token_ids if not 0 <= t < model_output.shape[-1]]
    if outside:
        raise ValueError(f"{target}: token ids {outside} lie outside the model's vocabulary of "
                         f"{model_output.shape[-1]}; take ids from wrapper.token_id(word).")
    return model_output


class WordTarget:
    """The next-token logit of a word that the tokenizer keeps as one token: ``WordTarget(wrapper, "red")``.
    A word split into several tokens raises ``ValueError``: explain it as an answer instead."""

    def __init__(self, wrapper, word: str) -> None:
        self.word = word
        self.category = wrapper.token_id(word)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return _next_token_logits(model_output, f"WordTarget({self.word!r})", self.category)[..., self.category]


class AnswerTarget:
    """The score of the wrapper's teacher-forced answer: the sum (or mean) of its tokens' log-probabilities, as set
    by ``answer_reduction``. The same as ``targets=None`` in answer mode, with a check that an answer is set."""

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        if model_output.shape[-1] != 1:
            raise ValueError(f"AnswerTarget needs a wrapper with an answer (its output has {model_output.shape[-1]} "
                             "columns, next-token logits): QwenVLWrapper(..., answer='...') or "
                             "wrapper.set_answer('...').")
        return model_output[..., 0]


class ContrastiveTarget:
    """Why ``token_a`` rather than ``token_b``: the difference of their next-token logits,
    ``logit[token_a] - alpha * logit[token_b]`` (grad-cam's FinerCAM contrasts a class with similar ones the same way).

    With ``alpha=1`` this also equals the difference of their log-probabilities, since both share one normaliser.
    Token ids come from :meth:`QwenVLWrapper.token_id`.
    """

    def __init__(self, token_a: int, token_b: int, alpha: float = 1.0) -> None:
        if token_a == token_b:
            raise ValueError("ContrastiveTarget needs two different tokens.")
        self.token_a, self.token_b, self.alpha = int(token_a), int(token_b), alpha

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        logits = _next_token_logits(model_output, "ContrastiveTarget", self.token_a, self.token_b)
        return logits[..., self.token_a] - self.alpha * logits[..., self.token_b]


class _InOutput:
    """A grad-cam target whose ``category`` must be a column of the model's output: grad-cam swallows the IndexError
    of one beyond it and fails later with "need at least one array to stack"."""

    def __init__(self, target) -> None:
        self.target = target

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        category = getattr(self.target, "category", None)
        columns = model_output.shape[-1]
        if isinstance(category, int) and not 0 <= category < columns:
            raise ValueError(f"Target {type(self.target).__name__}({category}) lies outside the model's output of "
                             f"{columns} column(s) (a VLM's vocabulary, or 1 with an answer set; CLIP's texts; a "
                             "classifier's classes): take token ids from wrapper.token_id(word).")
        return self.target(model_output)


def checked_targets(targets, count: int):
    """``targets`` for ``count`` images, as grad-cam takes them: one per image (``None``: each image's predicted
    class), each refused with a clear error when its category lies outside the model's output."""
    if targets is None:
        return None
    targets = list(targets)
    if len(targets) != count:
        raise ValueError(f"Got {len(targets)} target(s) for {count} image(s): pass one target per image, or "
                         "targets=None to explain each image's predicted class.")
    return [_InOutput(target) for target in targets]
