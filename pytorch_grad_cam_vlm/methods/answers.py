"""Explaining answers, not one next token: the teacher-forced answer behind ``QwenVLWrapper(..., answer=...)``, and
per-token maps of an answer the model generates, batched so that one backward pass serves many tokens."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.image import ImageInput
from pytorch_grad_cam_vlm.models.answer_text import vision_token_ids
from pytorch_grad_cam_vlm.models.frame import ImageFrame, Size, prepare_images
from pytorch_grad_cam_vlm.models.state import explaining

class AnswerTokenScores(torch.nn.Module):
    """The wrapper seen as a model of ``(B, 3, H, W)`` images to ``(B, A)``: each teacher-forced answer token's
    ``"logit"`` or ``"log_prob"``. A target that picks column ``t`` explains token ``t`` with the answer before it as
    prefix: causal attention keeps later tokens out of position ``t - 1``, so one sequence serves every token."""

    def __init__(self, wrapper, score: str = "logit") -> None:
        super().__init__()
        self.wrapper = wrapper
        self.score = score

    @property
    def efficient_gradients(self) -> bool:
        """Whether the wrapper starts the autograd graph itself (read by the SmoothGrad twins)."""
        return self.wrapper.efficient_gradients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wrapper.answer_token_scores(x, self.score)

    def train(self, mode: bool = True) -> "AnswerTokenScores":
        self.training = mode  # the wrapped model keeps its mode, as with the wrapper itself
        return self


class AnswerSumTarget:
    """The sum of every answer token's score: the combined target of :func:`explain_generated`."""

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output.sum(-1)


@dataclass
class GeneratedExplanation:
    """What :func:`explain_generated` found: the generated ``tokens`` (ids and text), each token's probability under
    teacher forcing, one map per token ``maps`` ``(T, H0, W0)`` (token ``t`` explained with the tokens before it as
    prefix) and ``combined`` ``(H0, W0)``, the map of the sum of the tokens' scores, on the user's image (NaN where
    the model saw no part of it; ``docs/frames.md``); ``model_maps`` ``(T, H, W)`` and ``model_combined`` the same
    maps on the model's input, and ``frame`` where that input lies on the image."""

    token_ids: List[int]
    tokens: List[str]
    probabilities: np.ndarray
    maps: np.ndarray
    combined: np.ndarray
    text: str
    score: str
    model_maps: Optional[np.ndarray] = None
    model_combined: Optional[np.ndarray] = None
    frame: Optional[ImageFrame] = None


def generate_answer(wrapper, x: torch.Tensor, max_new_tokens: int = 16, **generate_kwargs) -> List[int]:
    """Greedy ``model.generate`` on the wrapper's prompt and one image ``(1, 3, H, W)``: the new token ids, without
    the end-of-turn token and what follows it. Vision tokens are never generated."""
    if wrapper.answer is not None:
        raise ValueError("The wrapper already has an answer; generate from the prompt alone (wrapper.set_answer(None)).")
    wrapper._check_images(x, wrapper.token_cell)
    if x.shape[0] != 1:
        raise ValueError(f"Generate an answer for one image at a time, got a batch of {x.shape[0]}.")
    inputs = wrapper.model_inputs(x)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False,
                  suppress_tokens=vision_token_ids(wrapper.processor.tokenizer))
    kwargs.update(generate_kwargs)
    with explaining(wrapper.model), torch.no_grad():
        sequences = wrapper.model.generate(**inputs, **kwargs)
    new = sequences[0, inputs["input_ids"].shape[1]:].tolist()
    stops = wrapper.model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, (list, tuple)) else [stops]) - {None}
    end = next((i for i, t in enumerate(new) if t in stops), len(new))
    if end == 0:
        raise ValueError("The model ended its turn at once: it generated no answer tokens to explain.")
    return new[:end]


def explain_generated(wrapper, x: Union[torch.Tensor, ImageInput], target_layers: Sequence[torch.nn.Module],
                      method: Callable = GradCAM, max_new_tokens: int = 16, score: str = "logit",
                      batch_size: int = 8, answer: Union[str, Sequence[int], None] = None,
                      generate_kwargs: Optional[dict] = None, image_size: Optional[Size] = None,
                      **cam_kwargs) -> GeneratedExplanation:
    """Generate the answer to the wrapper's prompt for one image and explain each token, the maps on that image.

    ``x``: the image (a path, PIL image or uint8 array, preprocessed by ``wrapper.preprocess``), or its input
    ``(1, 3, H, W)`` as ``wrapper.preprocess`` makes it, with ``image_size`` ``(height, width)`` of the image it was
    made from (without it, the input is taken as the image), as :func:`~pytorch_grad_cam_vlm.explain` takes them.

    Token ``t``'s map explains its ``score`` (``"logit"``, as the one-token wrapper does, or ``"log_prob"``) with the
    tokens before it teacher-forced; the combined map explains the sum of all tokens' scores (with ``"log_prob"``,
    the answer target of ``QwenVLWrapper(..., answer=...)``). The per-token targets are batched: each batch row holds
    the same image and the whole answer and targets one token, so ``T`` tokens take ``ceil((T + 1) / batch_size)``
    passes of ``method``. ``method`` is a grad-cam class or any callable ``(model, target_layers, reshape_transform)``
    (e.g. a ``functools.partial`` with its options); ``cam_kwargs`` go to its call (``aug_smooth``,
    ``eigen_smooth``). ``answer`` (text or token ids) skips generation and explains that answer instead. The
    wrapper's answer is restored after.
    """
    if score not in ("logit", "log_prob"):
        raise ValueError(f"score must be 'logit' or 'log_prob', got {score!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    x, (frame, *more) = prepare_images(wrapper, x, image_size)
    if more:
        raise ValueError(f"Explain one image's answer at a time, got a batch of {len(more) + 1}.")
    previous = (wrapper.answer, wrapper.answer_reduction)
    try:
        if answer is None:
            token_ids = generate_answer(wrapper, x, max_new_tokens, **(generate_kwargs or {}))
        else:  # text is tokenised with the chat, as the wrapper's answer target does
            wrapper.set_answer(answer)
            token_ids = wrapper.layout_for(x.shape[2], x.shape[3]).answer_ids.tolist()
        wrapper.set_answer(token_ids)
        with torch.no_grad():
            probabilities = wrapper.answer_token_scores(x, "log_prob")[0].exp().cpu().numpy()
        targets = [ClassifierOutputTarget(t) for t in range(len(token_ids))] + [AnswerSumTarget()]
        maps = []
        with method(model=AnswerTokenScores(wrapper, score), target_layers=list(target_layers),
                    reshape_transform=wrapper.reshape_transform) as cam:
            for start in range(0, len(targets), batch_size):
                chunk = targets[start:start + batch_size]
                maps.append(cam(input_tensor=x.expand(len(chunk), -1, -1, -1), targets=chunk, **cam_kwargs))
        maps = np.concatenate(maps)
    finally:
        wrapper.set_answer(*previous)
    tokenizer = wrapper.processor.tokenizer
    on_image = frame.to_image(maps)
    return GeneratedExplanation(token_ids=token_ids, tokens=[tokenizer.decode([t]) for t in token_ids],
                                probabilities=probabilities, maps=on_image[:-1], combined=on_image[-1],
                                text=tokenizer.decode(token_ids, skip_special_tokens=True), score=score,
                                model_maps=maps[:-1], model_combined=maps[-1], frame=frame)


def plot_per_token(explanation: GeneratedExplanation, rgb: np.ndarray, path: Optional[str] = None,
                   columns: int = 4, title: Optional[str] = None):
    """The per-token figure: the combined map under the whole answer, then each token with its probability over its
    map, as overlays on ``rgb`` ``(H, W, 3)`` in [0, 1] (the image the maps lie on). Saved as a PNG at ``path``
    when given; returns the matplotlib ``Figure`` (drawn with the Agg canvas, no window)."""
    from pytorch_grad_cam_vlm.visualize import DPI, overlay, panel_figure

    if explanation.maps.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"The maps are {explanation.maps.shape[1:]} and the image {rgb.shape[:2]}: pass the image "
                         "that was explained, on which the maps lie (np.asarray(picture) / 255, or wrapper.to_rgb(x)[0] "
                         "for a tensor explained without image_size).")
    panels = [(explanation.combined, f"all {len(explanation.tokens)} tokens")]
    panels += [(m, f"{t.strip() or repr(t)} · p={p:.2f}")
               for t, p, m in zip(explanation.tokens, explanation.probabilities, explanation.maps)]
    columns = min(columns, len(panels))
    figure = panel_figure([(overlay(rgb, cam), label) for cam, label in panels], math.ceil(len(panels) / columns),
                          columns, rgb.shape[:2], title or f"answer: {explanation.text!r} · {explanation.score}",
                          unseen_shown=bool(np.isnan(explanation.maps).any()))
    if path is not None:
        figure.savefig(path, dpi=DPI)
    return figure
