"""The explorer's page logic (``pytorch-grad-cam-vlm app``) as plain functions of paths, numpy arrays and dicts, so
that it runs and tests without a browser; :mod:`pytorch_grad_cam_vlm.cli.explorer_page` is the Gradio shell around it.

One request explains one image the way ``explain`` does (:func:`~pytorch_grad_cam_vlm.methods.auto.explain`: the
candidate methods x layers, each map scored by the deletion check, the best kept), at the decoder's layers or the
vision encoder's blocks, and adds what the page shows: every layer's map of the chosen method (the layer strip) and,
for a generated answer, one map per token (:func:`~pytorch_grad_cam_vlm.methods.answers.explain_generated`).
"""
from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from pytorch_grad_cam_vlm.cli.common import MAX_ASPECT_RATIO, smooth_options
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.layers import PROJECTOR, Layer, has_projector, layer_modules
from pytorch_grad_cam_vlm.methods.auto import Explanation, candidate_layers, candidate_methods, explain, is_auto
from pytorch_grad_cam_vlm.methods.catalog import cam_options, check_answer_method, is_smooth, uses_gradients
from pytorch_grad_cam_vlm.methods.prompt_words import prompt_word_relevance, takes_prompt
from pytorch_grad_cam_vlm.methods.sweep import check_sweep, layer_sweep, select_layers
from pytorch_grad_cam_vlm.metrics.answer_change import answer_change
from pytorch_grad_cam_vlm.metrics.map_check import MapCheck
from pytorch_grad_cam_vlm.models.registry import QWEN_MODEL_CLASSES, Subject, make_subject
from pytorch_grad_cam_vlm.visualize import overlay, save_maps, save_overlay

TARGETS = ("decoder", "vision encoder")
MAX_PIXELS = 40_000_000  # an upload with more pixels is refused before it is decoded in full
KEEP_REQUESTS = 16  # output folders of the latest requests kept in the work folder
Progress = Callable[[float, str], None]


class EncoderView(torch.nn.Module):
    """A wrapper seen with its vision encoder's blocks as :attr:`layers`: what :func:`explain` and the layer choices
    need to explain vision blocks as they explain decoder layers. Everything else is the wrapper's."""

    def __init__(self, wrapper: torch.nn.Module) -> None:
        super().__init__()
        self.wrapper = wrapper

    @property
    def layers(self) -> List[torch.nn.Module]:
        """The vision blocks that reach the decoder (LLaVA's tower stops at its deepest feature layer)."""
        blocks = self.wrapper.vision_blocks
        return blocks[:getattr(self.wrapper, "feature_blocks", [len(blocks) - 1])[-1] + 1]

    @property
    def last_layer_blank(self) -> bool:
        return False  # every block feeds the merger (or projector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wrapper(x)

    def train(self, mode: bool = True) -> "EncoderView":
        self.training = mode  # the wrapped model keeps its mode, as with the wrapper itself
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(self._modules["wrapper"], name)


@dataclass
class Explorer:
    """A model loaded once for the page, the folder every file of the page goes to, and the lock that keeps its
    requests one at a time."""

    model: torch.nn.Module
    processor: object
    family: str
    name: str
    work_dir: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def takes_prompt(self) -> bool:
        """Qwen and LLaVA models answer a prompt; CLIP models score captions (the prompt box, one per line)."""
        return self.family in QWEN_MODEL_CLASSES

    @property
    def targets(self) -> Sequence[str]:
        """Where maps can be taken: :data:`TARGETS`, or the vision encoder alone for CLIP models."""
        return TARGETS if self.takes_prompt else TARGETS[1:]

    def subject(self, prompt: str) -> Subject:
        """A fresh wrapper of the model for ``prompt`` (captions for CLIP models)."""
        if self.takes_prompt:
            return make_subject(self.family, self.model, self.processor, prompt, None)
        return make_subject(self.family, self.model, self.processor, None, captions(prompt))

    def layer_count(self, target: str) -> int:
        """How many layers the layer slider of ``target`` spans."""
        subject = self.subject("What is this?" if self.takes_prompt else "a photo\nan image")
        return len(target_view(subject.wrapper, target).layers)


def captions(text: str) -> List[str]:
    """The captions of a CLIP prompt box: one per line, blank lines left out."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def target_view(wrapper: torch.nn.Module, target: str) -> torch.nn.Module:
    """The wrapper itself for ``"decoder"`` (CLIP: its vision layers), an :class:`EncoderView` for
    ``"vision encoder"`` on models with a decoder."""
    if target not in TARGETS:
        raise InputError(f"Unknown target {target!r}: use one of {', '.join(TARGETS)}.")
    return EncoderView(wrapper) if target == TARGETS[1] and hasattr(wrapper, "vision_blocks") else wrapper


@dataclass
class Request:
    """What the page asks: an image file, the prompt (captions for CLIP), an optional answer, the method
    (``auto`` or a name), the layer (``None``: auto), the target, the Smooth options and whether to explain the
    generated answer token by token."""

    image: Optional[str]
    prompt: str
    answer: str = ""
    method: str = "auto"
    layer: Optional[int] = None
    target: str = TARGETS[0]
    n_samples: Optional[int] = None
    noise_level: Optional[float] = None
    per_token: bool = False
    max_new_tokens: int = 16
    name: str = "image"


def read_image(path: Optional[str]):
    """The uploaded file as an RGB image (:func:`~pytorch_grad_cam_vlm.image.load_rgb`), refused with one message
    when it is missing, not an image, or over :data:`MAX_PIXELS`."""
    from PIL import Image

    from pytorch_grad_cam_vlm.image import load_rgb

    if not path:
        raise InputError("Upload an image first (or click one of the examples).")
    try:
        with Image.open(path) as opened:
            width, height = opened.size
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{os.path.basename(path)} is not an image this page can read: upload a PNG, JPEG, WebP, "
                         "GIF or BMP file.") from error
    if width * height > MAX_PIXELS:
        raise InputError(f"The image is {width}x{height} pixels, over the page's limit of {MAX_PIXELS:,}: scale it "
                         "down first.")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputError(f"The image is {width}x{height} pixels: an aspect ratio over {MAX_ASPECT_RATIO} cannot be "
                         "resized onto the model's token grid; crop it first.")
    try:
        return load_rgb(path)
    except (OSError, ValueError) as error:
        raise InputError(f"{os.path.basename(path)} cannot be read as an image: {str(error).splitlines()[0]}") \
            from error


def check_request(explorer: Explorer, request: Request):
    """Every input checked before the model runs: ``(image, methods, smooth options)``; bad input raises an
    :class:`InputError` whose message the page shows."""
    image = read_image(request.image)
    if request.target not in explorer.targets:
        raise InputError(f"A {explorer.family} model has no {request.target} layers: use "
                         f"{' or '.join(explorer.targets)}.")
    if not request.prompt or not request.prompt.strip():
        raise InputError("Type a question in the prompt box." if explorer.takes_prompt
                         else "Type the captions to score the image against, one per line.")
    if not explorer.takes_prompt:
        if request.per_token or request.answer.strip():
            raise InputError(f"A {explorer.family} model scores captions: it has no answer to explain.")
        if len(captions(request.prompt)) < 2 or len(set(captions(request.prompt))) != len(captions(request.prompt)):
            raise InputError("Give at least two different captions, one per line.")
    methods = candidate_methods(request.method)
    if request.answer.strip() or request.per_token:
        for cls in methods:
            check_answer_method(cls)
    smooth = smooth_options(methods, request.n_samples, request.noise_level, 0) \
        if all(is_smooth(cls) for cls in methods) else {}
    return image, methods, smooth


def choose_layers(view: torch.nn.Module, methods: Sequence[type], smooth: dict,
                  layer: Optional[int]) -> List[Layer]:
    """The candidate layers of ``view``: the projector and every usable layer (a spread of 8 on deeper models) for
    ``layer=None``, as ``explain --layers auto`` takes them, else ``[layer]``."""
    last_blank = view.last_layer_blank and all(uses_gradients(cls, smooth) for cls in methods)
    n_layers, projector = len(view.layers), has_projector(view)
    try:
        layers = candidate_layers(n_layers, last_blank, projector) if layer is None else \
            select_layers(n_layers, [layer], last_blank, projector)
        for cls in methods:
            check_sweep(cls, len(layers))
    except ValueError as error:
        raise InputError(str(error)) from error
    return layers


def explain_request(explorer: Explorer, request: Request, progress: Optional[Progress] = None) -> dict:
    """Explain one request (see the module's docstring), one request at a time. Returns the page's result: the
    chosen ``map`` ``(H0, W0)`` on the uploaded picture (NaN where the model saw no part of it, as the CLI's maps;
    ``docs/frames.md``) and its ``overlay`` on ``rgb``, the picture; the method, layer and deletion check, the layer
    ``strip``, the answer's ``tokens`` and ``token_maps`` when asked, all on the picture, and the ``files``
    written."""
    progress = progress or (lambda fraction, text: None)
    image, methods, smooth = check_request(explorer, request)
    with explorer.lock:
        progress(0.05, "Preparing the image")
        subject = explorer.subject(request.prompt)
        wrapper = subject.wrapper
        view = target_view(wrapper, request.target)
        layers = choose_layers(view, methods, smooth, request.layer)
        try:
            x = wrapper.preprocess(image)
            if request.per_token:
                result = per_token_request(subject, view, x, image, request, methods, smooth, layers, progress)
            else:
                result = single_request(subject, view, x, image, request, methods, smooth, layers, progress)
        except ValueError as error:  # the wrapper's and grad-cam's refusals (an answer it cannot tokenise, ...)
            raise InputError(str(error).splitlines()[0]) from error
        progress(0.95, "Writing the files")
        result["files"] = write_files(explorer.work_dir, request.name, result)
    return result


def single_request(subject: Subject, view, x: torch.Tensor, image, request: Request, methods, smooth: dict,
                   layers: List[int], progress: Progress) -> dict:
    """The map of the predicted token (or of ``request.answer``'s score) on ``image`` (the picture ``x`` was made
    from), as ``explain`` draws it in single mode."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if request.answer.strip():
        subject.wrapper.set_answer(request.answer.strip())
    progress(0.15, "Predicting")
    index, label, probability = subject.predict(x)
    targets = [ClassifierOutputTarget(index)]
    progress(0.3, f"Maps of {len(methods)} method(s) x {len(layers)} layer(s) and their deletion checks")
    result = explain(view, x, targets, methods, layers, options=smooth, image_size=image.size[::-1],
                     fallback=is_auto(request.method))
    progress(0.75, "Every layer's map for the strip")
    page = page_result(view, x, image, result, targets, methods, smooth, request, predicted_token=label,
                       probability=probability)
    if not request.answer.strip():  # an asked answer's output is its one score: there is no top answer to change
        progress(0.85, "The smallest region that changes the answer")
        page["answer_change"] = answer_change(view, x, result.model_maps[0]).share
    if takes_prompt(subject.wrapper):
        progress(0.9, "The prompt's words")
        page.update(prompt_word_relevance(subject.wrapper, x, targets[0]).report())
    return page


def per_token_request(subject: Subject, view, x: torch.Tensor, image, request: Request, methods, smooth: dict,
                      layers: List[int], progress: Progress) -> dict:
    """The generated answer (or ``request.answer``) token by token, as ``explain --per-token`` draws it: the whole
    answer's map chosen by the deletion check, then each token's map with that method and layer."""
    from functools import partial

    from pytorch_grad_cam_vlm.methods.answers import explain_generated, generate_answer

    wrapper = subject.wrapper
    progress(0.1, "Generating the answer")
    if request.answer.strip():
        wrapper.set_answer(request.answer.strip())
        answer = wrapper.layout_for(x.shape[2], x.shape[3]).answer_ids.tolist()
    else:
        answer = generate_answer(wrapper, x, request.max_new_tokens)
    wrapper.set_answer(answer)
    progress(0.25, f"Maps of the whole answer: {len(methods)} method(s) x {len(layers)} layer(s), checked")
    whole = explain(view, x, None, methods, layers, options=smooth, image_size=image.size[::-1],
                    fallback=is_auto(request.method))
    result = page_result(view, x, image, whole, whole.targets, methods, smooth, request, probability=None)
    wrapper.set_answer(None)
    m, l = whole.candidate_choice(0)  # a gradient method's layer, also where occlusion was chosen
    method_cls = methods[m]
    progress(0.6, "One map per answer token")
    tokens = explain_generated(wrapper, x, layer_modules(view, whole.candidate_layers[l:l + 1]), answer=answer,
                               method=partial(method_cls, **cam_options(method_cls, wrapper, smooth)),
                               image_size=image.size[::-1])
    result.update(predicted_token=tokens.text, probability=float(np.prod(tokens.probabilities)),
                  tokens=list(tokens.tokens),
                  token_probabilities=[float(p) for p in tokens.probabilities], token_maps=tokens.maps)
    return result


def page_result(view, x: torch.Tensor, image, result: Explanation, targets: list, methods, smooth: dict,
                request: Request, predicted_token: str = "", probability: Optional[float] = None) -> dict:
    """The page's dict of one :class:`Explanation` of one image: the chosen map, its check and warning, and the
    chosen method's map at every usable layer (the strip), drawn on ``image`` (the picture ``x`` was made from) as
    the CLI draws them."""
    m, _ = result.candidate_choice(0)  # the strip's method: the chosen one, or the best gradient one
    layer, check = result.layers[0], result.checks[0]
    rgb = np.asarray(image, dtype=np.float32) / 255
    strip_layers, strip_maps, strip_checks = layer_strip(view, x, result, targets, methods[m], smooth)
    strip_maps = result.frames[0].to_image(strip_maps)
    return dict(rgb=rgb, map=result.maps[0], overlay=overlay(rgb, result.maps[0]), method=result.methods[0],
                method_spec=request.method, layer=layer, target=request.target, check=check.score,
                verdict=check.verdict, null_margin=check.null_margin,
                warning=" ".join(w for w in [result.layer_warning(request.name, layer),
                                             *result.fallback_lines(request.name, gradient_drawn=True)] if w),
                candidates=f"{'/'.join(result.candidate_methods)} x layers "
                           f"{','.join(map(str, result.candidate_layers))}",
                predicted_token=predicted_token, probability=probability, strip_layers=strip_layers,
                strip_maps=strip_maps, strip_checks=strip_checks, tokens=[], token_probabilities=[], token_maps=None)


def layer_strip(view, x: torch.Tensor, result: Explanation, targets: list, method_cls: type, smooth: dict):
    """``(layers, maps (L, H, W), checks)`` of ``method_cls`` at every usable layer of ``view`` (the projector, which
    the page's layer slider cannot name, left out): the candidates' maps when they are all of them, else one sweep
    pass (checks ``None`` where not measured). A method that takes one layer per call (ShapleyCAM) shows its
    candidates only."""
    m = result.candidate_methods.index(method_cls.__name__)
    measured = {k: c for k, c in zip(result.candidate_layers, result.candidate_checks[0][m])}
    candidates = [k for k in result.candidate_layers if k != PROJECTOR]
    usable = list(range(len(view.layers) - int(view.last_layer_blank and uses_gradients(method_cls, smooth))))
    try:
        check_sweep(method_cls, len(usable))
    except ValueError:
        usable = candidates
    if usable == candidates:
        maps = result.candidate_maps[0, m, [result.candidate_layers.index(k) for k in usable]]
    else:
        with layer_sweep(method_cls)(model=view, target_layers=[view.layers[k] for k in usable],
                                     **cam_options(method_cls, view, smooth)) as cam:
            maps = cam(input_tensor=x, targets=targets[:1])[0]
    return usable, maps, [check_score(measured.get(k)) for k in usable]


def check_score(check: Optional[MapCheck]) -> Optional[float]:
    """A check's score for JSON: ``None`` where not measured or blank."""
    return None if check is None or check.blank else float(check.score)


def write_files(work_dir: str, name: str, result: dict) -> List[str]:
    """The downloads of one request in a fresh folder under ``work_dir/outputs``: the map as ``.npy`` ``(1, H0, W0)``
    on the picture, NaN where unseen (as ``explain`` writes it), the overlay PNG at the picture's size and, per
    token, the token maps ``(T, H0, W0)``.
    Older request folders beyond :data:`KEEP_REQUESTS` are removed."""
    import shutil

    outputs = os.path.join(work_dir, "outputs")
    os.makedirs(outputs, exist_ok=True)
    older = sorted((os.path.join(outputs, d) for d in os.listdir(outputs)), key=os.path.getmtime)
    for folder in older[:max(0, len(older) - KEEP_REQUESTS + 1)]:
        shutil.rmtree(folder, ignore_errors=True)
    folder = tempfile.mkdtemp(dir=outputs)
    stem = os.path.join(folder, f"{safe_stem(name)}_{result['method']}_layer{result['layer']}")
    files = [save_maps(f"{stem}_map.npy", result["map"][None]), save_overlay(f"{stem}_overlay.png", result["rgb"],
                                                                            result["map"])]
    if result["token_maps"] is not None:
        files.append(save_maps(f"{stem}_per_token.npy", result["token_maps"]))
    return files


def safe_stem(name: str) -> str:
    """A file name stem from an upload's name: letters, digits, ``-`` and ``_`` only."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.splitext(os.path.basename(name))[0])
    return stem[:60] or "image"
