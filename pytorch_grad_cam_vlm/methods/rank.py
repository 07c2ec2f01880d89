"""Which image matches a caption, how sure the model is, and where in each image it looked: retrieval by asking a
prompt-taking VLM a question per image, with a map per image from :func:`~pytorch_grad_cam_vlm.methods.auto.explain`
(so every map comes with its deletion check).

Two scorings:

- **yes/no** (``caption=``): the model is asked ``template.format(caption=caption)`` (:data:`DEFAULT_TEMPLATE`) and
  the score is ``p(yes) / (p(yes) + p(no))``, the softmax of the next-token logits over the two words
  (:data:`YES_NO`). The map explains ``logit(yes) - logit(no)``, the log-odds of that score
  (:class:`~pytorch_grad_cam_vlm.methods.targets.ContrastiveTarget`).
- **answer** (``question=`` and ``answer=``): the answer is teacher-forced after the question and the score is its
  probability, ``exp`` of the sum of its tokens' log-probabilities: what ``explain --answer`` scores. This works on
  any model, including the tiny demo model, which was never taught to say yes or no.

The entropy of each image's score is the binary entropy in bits of ``(score, 1 - score)``: 0 when the model is sure
either way, 1 at 0.5. :func:`rank_images` ranks images for one query, :func:`rank_captions` the reverse: captions (or
answers) for one image.

    ranking = rank_images(wrapper, ["a.png", "b.png"], question="What shape is the red object?", answer="circle")
    ranking.best, ranking.order, ranking.scores, ranking.entropies, ranking.maps, ranking.checks
"""
from __future__ import annotations

import string
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.methods.auto import explain
from pytorch_grad_cam_vlm.methods.targets import AnswerTarget, ContrastiveTarget
from pytorch_grad_cam_vlm.metrics.deletion_check import auto_batch_size
from pytorch_grad_cam_vlm.metrics.map_check import MapCheck
from pytorch_grad_cam_vlm.models.answer_text import VISION_TOKENS
from pytorch_grad_cam_vlm.models.frame import ImageFrame
from pytorch_grad_cam_vlm.models.multi_image import MultiImage, prepare_several, takes_several
from pytorch_grad_cam_vlm.models.qwen_vl import check_prompt

# The question of retrieval code built on Qwen-VL, and the words its instruction-tuned models answer with (the first
# word of an answer has no leading space: Qwen's tokenizer gives "Yes" and " Yes" their own ids). A convention, not a
# measurement: no trained yes/no model can be loaded here; models whose tokenizer lacks these words (the tiny
# word-level ones) take yes_no=("yes", "no").
DEFAULT_TEMPLATE = "Does this image show: {caption}? Answer yes or no."
YES_NO = ("Yes", "No")


@dataclass(frozen=True)
class Query:
    """What the model is asked about one image: the ``prompt``, and the teacher-forced ``answer`` (``None``: the
    yes/no scoring)."""

    prompt: str
    answer: Optional[str] = None


@dataclass
class Ranking:
    """Ranked items (images for :func:`rank_images`, captions or answers for :func:`rank_captions`), in input order:
    each one's name, query, score, entropy, the map that explains its score (on the image itself), the method and
    layer :func:`explain` chose and the map's deletion check; ``order`` holds the indices best first."""

    names: List[str]
    queries: List[Query]
    scoring: str  # "yes/no" or "answer"
    scores: np.ndarray  # (N,) float64 in [0, 1]
    entropies: np.ndarray  # (N,) bits
    maps: List[np.ndarray]  # (H_i, W_i) float32 in [0, 1] on image i as passed (NaN where the model saw none of it)
    methods: List[str]
    layers: list
    checks: List[MapCheck]
    rgb: List[np.ndarray]  # (H_i, W_i, 3) in [0, 1]: image i as passed, which its map lies on

    @property
    def order(self) -> np.ndarray:
        """Item indices by score, best first (ties keep input order)."""
        return np.argsort(-self.scores, kind="stable")

    @property
    def best(self) -> int:
        """The index of the best-scoring item."""
        return int(self.order[0])

    def rows(self) -> List[dict]:
        """One report row per item, best first."""
        return [dict(rank=rank + 1, index=int(i), name=self.names[i], prompt=self.queries[i].prompt,
                     answer=self.queries[i].answer or "", scoring=self.scoring,
                     score=round(float(self.scores[i]), 6), entropy=round(float(self.entropies[i]), 6),
                     method=self.methods[i], layer=self.layers[i], check=round(self.checks[i].score, 6),
                     peak_drop=round(self.checks[i].peak_drop, 6), verdict=self.checks[i].verdict)
                for rank, i in enumerate(self.order)]

    def plot(self, path: str, title: Optional[str] = None, columns: int = 4) -> str:
        """The items in rank order, each its map's overlay labelled with rank, name, score, entropy and check, as a
        PNG at ``path`` (each image scaled to fit, centred on a white panel as large as the largest image). Returns
        ``path``."""
        import cv2

        from pytorch_grad_cam_vlm.visualize import DPI, overlay, panel_figure

        height, width = max(r.shape[0] for r in self.rgb), max(r.shape[1] for r in self.rgb)
        panels = []
        for rank, i in enumerate(self.order):
            canvas = np.full((height, width, 3), 255, dtype=np.uint8)
            drawn = overlay(self.rgb[i], self.maps[i])
            scale = min(height / drawn.shape[0], width / drawn.shape[1])  # the images are the users': any size
            drawn = cv2.resize(drawn, (max(1, round(drawn.shape[1] * scale)), max(1, round(drawn.shape[0] * scale))),
                               interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            top, left = (height - drawn.shape[0]) // 2, (width - drawn.shape[1]) // 2
            canvas[top:top + drawn.shape[0], left:left + drawn.shape[1]] = drawn
            panels.append((canvas, f"#{rank + 1} {self.names[i][:24]} · {self.scores[i]:.3f} · "
                                   f"H {self.entropies[i]:.2f} · {self.checks[i].verdict}"))
        columns = min(columns, len(panels))
        rows = -(-len(panels) // columns)
        figure = panel_figure(panels, rows, columns, (height, width), title or self._title())
        figure.savefig(path, dpi=DPI)
        return path

    def _title(self) -> str:
        query = self.queries[self.best]
        return f"{self.scoring} · {query.prompt}" + (f" → {query.answer}" if query.answer else "")


def yes_no_prompt(caption: str, template: str = DEFAULT_TEMPLATE) -> str:
    """``template`` with ``caption`` in its one ``{caption}`` placeholder; a template without it (or with other
    fields) is refused."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if fields != ["caption"]:
        raise ValueError(f"The caption template must hold one {{caption}} placeholder and no other field, got "
                         f"{template!r}; e.g. {DEFAULT_TEMPLATE!r}.")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"A caption must be non-empty text, got {caption!r}.")
    return template.format(caption=caption)


@contextmanager
def asking(wrapper: torch.nn.Module, query: Query) -> Iterator[torch.nn.Module]:
    """The wrapper asks ``query`` inside the block (its prompt, its teacher-forced answer or next-token logits), and
    its own prompt and answer again afterwards."""
    if not hasattr(wrapper, "set_answer") or not hasattr(wrapper, "prompt"):
        raise ValueError(f"Ranking asks a question, and {type(wrapper).__name__} takes none: use a prompt-taking "
                         "wrapper (QwenVLWrapper, Qwen3VLWrapper, LlavaWrapper, Gemma3Wrapper, InternVLWrapper, "
                         "Idefics3Wrapper).")
    check_prompt(query.prompt, VISION_TOKENS)
    saved = wrapper.prompt, wrapper.answer, wrapper.answer_reduction
    try:
        wrapper.prompt = query.prompt
        wrapper.set_answer(query.answer, "sum")
        yield wrapper
    finally:
        wrapper.prompt = saved[0]
        wrapper.set_answer(saved[1], saved[2])


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of ``(p, 1 - p)``, 0 at 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -(p * np.log2(p)) - (1 - p) * np.log2(1 - p)
    return np.nan_to_num(terms, nan=0.0)


def query_scores(wrapper: torch.nn.Module, x: torch.Tensor, yes_no: Optional[Tuple[int, int]]) -> torch.Tensor:
    """``(B,)`` float64 scores of images ``x`` for the wrapper's current query: ``softmax(logits[[yes, no]])[0]``
    with ``yes_no`` token ids, else the teacher-forced answer's probability."""
    with torch.no_grad():
        output = wrapper(x).double()
    if yes_no is None:
        return output[:, 0].exp()
    return torch.softmax(output[:, list(yes_no)], dim=-1)[:, 0]


def _target(yes_no: Optional[Tuple[int, int]]):
    return AnswerTarget() if yes_no is None else ContrastiveTarget(*yes_no)


@dataclass
class _Inputs:
    """The ranked images as the model takes them (``xs``), their canvas boxes beside a query image (``None``
    without one), where each ranked image lies on its input (``frames``: on its box of the canvas) and the images."""

    xs: List[torch.Tensor]
    boxes: list
    frames: List[ImageFrame]
    pictures: List[np.ndarray]  # (H0, W0, 3) in [0, 1]


def _preprocess(wrapper: torch.nn.Module, images: Sequence[ImageInput], names: Sequence[str],
                query_image: Optional[ImageInput] = None) -> _Inputs:
    """Every image through the wrapper's own preprocessing before any model work, a failure naming its image; with
    a ``query_image``, each image beside it on one canvas (a family that takes several images in one prompt)."""
    if len(images) == 0:
        raise ValueError("Nothing to rank: pass at least one image.")
    if query_image is not None:
        takes_several(wrapper)  # the query image goes beside each image in one prompt
        try:
            query_image = load_rgb(query_image)  # read once for all the images
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(f"the query image: {error}") from error
    inputs = _Inputs([], [], [], [])
    for image, name in zip(images, names):
        try:
            picture = load_rgb(image)
            if query_image is None:
                x = wrapper.preprocess(picture)
                frame = wrapper.image_frame(picture.size[::-1], tuple(x.shape[-2:]))
            else:  # the ranked image is the second of the prompt
                x, (_, frame) = prepare_several(wrapper, MultiImage([query_image, picture]))
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(f"{name}: {error}") from error
        inputs.xs.append(x)
        inputs.boxes.append(getattr(wrapper, "image_boxes", None) if query_image is not None else None)
        inputs.frames.append(frame)
        inputs.pictures.append(np.asarray(picture, dtype=np.float32) / 255)
    return inputs


def _yes_no_ids(wrapper: torch.nn.Module, yes_no: Sequence[str]) -> Tuple[int, int]:
    if len(yes_no) != 2 or yes_no[0] == yes_no[1]:
        raise ValueError(f"yes_no takes two different words, got {tuple(yes_no)}.")
    try:
        return wrapper.token_id(yes_no[0]), wrapper.token_id(yes_no[1])
    except ValueError as error:
        raise ValueError(f"yes_no={tuple(yes_no)}: {error} Pass the model's own yes/no words (yes_no=('yes', 'no') "
                         "for a lower-case vocabulary), or score a question and an answer instead.") from error


def _rank(wrapper: torch.nn.Module, inputs: _Inputs, queries: Sequence[Query], names: Sequence[str],
          yes_no: Optional[Tuple[int, int]], batch_size: Optional[int], explain_options: dict) -> Ranking:
    """Score and explain item ``i`` (image ``inputs.xs[i]`` asked ``queries[i]``); items that share a query and an
    image size go through the model together, ``batch_size`` (default: the deletion check's
    :func:`~pytorch_grad_cam_vlm.metrics.deletion_check.auto_batch_size`) images at a time. Each map lies on its
    image (``inputs.frames``); items on a canvas beside a query image keep the map of their own box, the second."""
    xs, boxes = inputs.xs, inputs.boxes
    groups: Dict[tuple, List[int]] = {}
    for i, (x, query) in enumerate(zip(xs, queries)):
        groups.setdefault((query, tuple(x.shape[2:]), boxes[i]), []).append(i)
    n = len(xs)
    scores, maps, methods, layers, checks = np.zeros(n), [None] * n, [""] * n, [None] * n, [None] * n
    for (query, _, canvas_boxes), members in groups.items():
        if canvas_boxes is not None:
            wrapper.image_boxes = canvas_boxes
        with asking(wrapper, query):
            step = batch_size or auto_batch_size(xs[members[0]])
            for start in range(0, len(members), step):
                chunk = members[start:start + step]
                x = torch.cat([xs[i] for i in chunk])
                scores[chunk] = query_scores(wrapper, x, yes_no).cpu().numpy()
                # the ranked image's map is its box of the canvas's; no split between it and the query image
                result = explain(wrapper, x, [_target(yes_no)] * len(chunk), split=False, **explain_options)
                for b, i in enumerate(chunk):
                    maps[i], methods[i] = result.model_maps[b], result.methods[b]
                    layers[i], checks[i] = result.layers[b], result.checks[b]
    for i, canvas_boxes in enumerate(boxes):
        if canvas_boxes is not None:  # the ranked image's part: the second box, beside the query image
            top, left, height, width = canvas_boxes.boxes[1]
            maps[i] = maps[i][top:top + height, left:left + width]
    return Ranking(names=list(names), queries=list(queries), scoring="answer" if yes_no is None else "yes/no",
                   scores=scores, entropies=binary_entropy(scores),
                   maps=[frame.to_image(m) for frame, m in zip(inputs.frames, maps)], methods=methods, layers=layers,
                   checks=checks, rgb=inputs.pictures)


def _queries(wrapper: torch.nn.Module, captions: Optional[Sequence[str]], question: Optional[str],
             answers: Optional[Sequence[str]], template: str, yes_no: Sequence[str]
             ) -> Tuple[List[Query], Optional[Tuple[int, int]]]:
    """The queries of a caption list (yes/no) or of a question with answers, checked; and the yes/no token ids."""
    if (captions is None) == (question is None):
        raise ValueError("Rank by a caption (yes/no scoring) or by a question and an answer: give one of them.")
    if captions is not None:
        if answers is not None:
            raise ValueError("An answer goes with a question, not with a caption.")
        queries = [Query(yes_no_prompt(c, template)) for c in captions]
        return queries, _yes_no_ids(wrapper, yes_no)
    if not answers or any(not isinstance(a, str) or not a.strip() for a in answers):
        raise ValueError(f"A question needs the answer to score, non-empty text; got {answers!r}.")
    return [Query(question, a) for a in answers], None


def rank_images(wrapper: torch.nn.Module, images: Sequence[ImageInput], caption: Optional[str] = None,
                question: Optional[str] = None, answer: Optional[str] = None, template: str = DEFAULT_TEMPLATE,
                yes_no: Sequence[str] = YES_NO, names: Optional[Sequence[str]] = None,
                batch_size: Optional[int] = None, query_image: Optional[ImageInput] = None,
                **explain_options) -> Ranking:
    """Rank ``images`` (paths, PIL images or uint8 arrays) by how well each matches ``caption`` (yes/no scoring,
    asked through ``template``), or by the probability of ``answer`` to ``question``; each image's map explains its
    score through :func:`~pytorch_grad_cam_vlm.methods.auto.explain` (``explain_options``: ``method``, ``layers``,
    ``fractions``, ``fill``, ``seed``, ``options``). ``names`` label the images (default ``image 0``, ...). Every
    input is checked before the model runs; the wrapper's own prompt and answer are kept. A ``query_image`` (the
    families that take several images in one prompt,
    :data:`~pytorch_grad_cam_vlm.models.multi_image.SEVERAL_IMAGES_FAMILIES`) goes first in every prompt, each image
    second on one canvas; each map is the image's part of the canvas's map, its check the canvas map's."""
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images.")
    queries, ids = _queries(wrapper, None if caption is None else [caption], question,
                            None if question is None else [answer], template, yes_no)
    saved = getattr(wrapper, "image_boxes", None)  # preprocess sets it: the caller's canvas comes back after
    try:
        inputs = _preprocess(wrapper, images, names, query_image)
        return _rank(wrapper, inputs, queries * len(images), names, ids, batch_size, explain_options)
    finally:
        if hasattr(wrapper, "image_boxes"):
            wrapper.image_boxes = saved


def rank_captions(wrapper: torch.nn.Module, image: ImageInput, captions: Optional[Sequence[str]] = None,
                  question: Optional[str] = None, answers: Optional[Sequence[str]] = None,
                  template: str = DEFAULT_TEMPLATE, yes_no: Sequence[str] = YES_NO, **explain_options) -> Ranking:
    """The reverse of :func:`rank_images`: rank ``captions`` (yes/no scoring) or the ``answers`` to ``question``
    for one ``image``, each with the map that explains its score. Each caption is its own prompt, so each is one
    pass of the model."""
    items = captions if captions is not None else answers
    if items is not None and len(items) == 0:
        raise ValueError("Nothing to rank: pass at least one caption or answer.")
    queries, ids = _queries(wrapper, captions, question, answers, template, yes_no)
    one = _preprocess(wrapper, [image], ["the image"])
    inputs = _Inputs(one.xs * len(queries), one.boxes * len(queries), one.frames * len(queries),
                     one.pictures * len(queries))
    return _rank(wrapper, inputs, queries, list(items), ids, None, explain_options)
