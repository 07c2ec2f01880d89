"""The map to trust, chosen by measurement: every candidate layer's map of every candidate method from one sweep pass
per method, each scored by the deletion check (:mod:`pytorch_grad_cam_vlm.metrics.deletion_check`) in batched
forward passes, and the map of the highest ``total`` (the check's score plus the drop when its peak is removed) kept
per image.

    result = explain(wrapper, x)                 # method="auto", layers="auto"
    result.maps[0], result.methods[0], result.layers[0], result.checks[0]

Which method and which layer localise best differs from model to model (``benchmarks/auto_layer.md``): a fixed
choice that suits one trained model points at distractors on another, while choosing per image by the check
follows each model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.image import ImageInput
from pytorch_grad_cam_vlm.layers import INPUT, PROJECTOR, Layer, has_projector, layer_modules, layer_name
from pytorch_grad_cam_vlm.methods.catalog import cam_options, draws_at_random, is_smooth, resolve_method
from pytorch_grad_cam_vlm.methods.choice import best_index, choose_map, occlusion_fallback
from pytorch_grad_cam_vlm.methods.sweep import LayerSpec, layer_sweep, reads_one_pass, select_layers
from pytorch_grad_cam_vlm.methods.targets import checked_targets
from pytorch_grad_cam_vlm.metrics.deletion_check import DEFAULT_FRACTIONS
from pytorch_grad_cam_vlm.metrics.image_split import ImageSplit, split_map
from pytorch_grad_cam_vlm.metrics.map_check import MapCheck, failure_warning
from pytorch_grad_cam_vlm.metrics.null import NULL_MAPS
from pytorch_grad_cam_vlm.metrics.reliance import VisualReliance, visual_reliance
from pytorch_grad_cam_vlm.metrics.sanity import pearson
from pytorch_grad_cam_vlm.models.frame import ImageFrame, Size, prepare_images
from pytorch_grad_cam_vlm.models.multi_image import MultiImage, prepare_several

# The candidates of method="auto", chosen on the two trained demo models (benchmarks/auto_rules.md: 200 + 100
# held-out samples each, every list at the projector and the decoder layers, ranked by the check's total): of the
# lists that reach occlusion on both seed-0 sets (demo 0.760 / 0.155, crosses 1.000 / 0.000), the best worst case over
# the four sets and, among those, the fewest methods. It points at the evidence 0.940 / 1.000 (demo / crosses, seed 0)
# and 0.950 / 1.000 (seed 1), at a distractor 0.045 / 0.000 and 0.020 / 0.000. The four-method list before it
# (+ LayerCAM, XGradCAM) gave 0.910 / 1.000 and 0.910 / 0.990 at twice the cost. GradCAM++ leads on the demo model and
# fails on the crosses model, GradCAMElementWise the other way round (benchmarks/auto_layer.md).
AUTO_METHODS = ("GradCAMPlusPlus", "GradCAMElementWise")
# Models with at most this many usable layers try every one of them; deeper ones a spread of this many, with no
# refining round around the best: on the trained models a spread of 3 of 7 layers already chose as well as every
# layer, and a refinement changed nothing (benchmarks/auto_refine.md).
CANDIDATE_LAYERS = 8
# The method name of the occlusion fallback's maps (at layer INPUT): methods.choice.occlusion_fallback.
OCCLUSION = "Occlusion"

MethodSpec = Union[str, type, Sequence[Union[str, type]]]


def candidate_layers(n_layers: int, last_layer_blank: bool = True, projector: bool = False,
                     spread: int = CANDIDATE_LAYERS) -> List[Layer]:
    """The layers ``layers="auto"`` tries: every usable layer of a model with at most ``spread`` of them, else
    ``spread`` layers spread evenly from the first to the last usable layer; first the :data:`PROJECTOR` when the
    model has one (``projector``)."""
    usable = n_layers - 1 if last_layer_blank else n_layers
    if usable < 1:
        raise ValueError(f"A model with {n_layers} layer(s) has no layer usable for gradient methods.")
    if usable <= spread:
        layers = list(range(usable))
    else:
        layers = sorted({int(round(i)) for i in np.linspace(0, usable - 1, spread)})
    # The projector's maps read the image tokens the decoder receives: on the crosses model they point at the cross
    # where every decoder layer's map peaks on the top row of tokens, which lifts auto to occlusion's 1.000 there
    # (benchmarks/auto_rules.md).
    return [PROJECTOR] + layers if projector else layers


def is_auto(method: MethodSpec) -> bool:
    """Whether ``method`` leaves the choice to ``explain`` (``"auto"``), not naming a method."""
    return isinstance(method, str) and method.strip().lower() == "auto"


def candidate_methods(method: MethodSpec) -> List[type]:
    """``"auto"``: :data:`AUTO_METHODS`; a name, a class, or a list of them."""
    if is_auto(method):
        method = AUTO_METHODS
    if isinstance(method, (str, type)):
        method = [method]
    classes = [resolve_method(m) if isinstance(m, str) else m for m in method]
    if not classes:
        raise ValueError("Give at least one method, or method='auto'.")
    return classes


@dataclass
class Explanation:
    """What :func:`explain` found for a batch of B images: the chosen map, method, layer and check per image, and
    every candidate's map and check (``candidate_maps[b, m, l]``, ``candidate_checks[b][m][l]``: ``partial`` where
    the staged choice scored a map at the first fraction only, ``None`` where ``choice="peak"`` did not check it).

    ``maps`` lie on the user's images (``frames[b].image_size``; NaN where the model saw no part of the image, as
    outside a center crop), ``model_maps`` and ``candidate_maps`` on the model's input ``x`` (what grad-cam gives);
    ``frames[b].to_image(...)`` carries any of the latter onto image ``b`` (``docs/frames.md``).

    Where every gradient candidate of an image fails the check and its target depends on the image, ``explain``
    keeps the occlusion fallback's map where that one passes (:func:`~pytorch_grad_cam_vlm.methods.choice.
    occlusion_fallback`): its method is :data:`OCCLUSION`, its layer :data:`~pytorch_grad_cam_vlm.layers.INPUT`,
    and :meth:`candidate_choice` still names the gradient candidate the check ranked best.

    For several images in one prompt (a :class:`~pytorch_grad_cam_vlm.models.multi_image.MultiImage`, or a canvas
    the wrapper prepared of them), ``maps`` lie on the canvas and ``split[b]`` says how the chosen map of input ``b``
    splits between the images: each one's share of its mass, the deletion check of its part, and its part on each
    image (:class:`~pytorch_grad_cam_vlm.metrics.image_split.ImageSplit`)."""

    maps: np.ndarray  # (B, H0, W0) float32 in [0, 1], NaN where unseen: on the user's images
    methods: List[str]
    layers: List[Layer]  # an index into wrapper.layers, or "projector"
    checks: List[MapCheck]
    candidate_methods: List[str]
    candidate_layers: List[Layer]
    candidate_maps: np.ndarray  # (B, M, L, H, W) on the model's input
    candidate_checks: List[List[List[Optional[MapCheck]]]]
    targets: list
    model_maps: Optional[np.ndarray] = None  # (B, H, W): the chosen maps on the model's input
    frames: Optional[List[ImageFrame]] = None  # where each input lies on its image
    reliance: Optional[List[VisualReliance]] = None  # how much each image's target depends on the image at all
    split: Optional[List[ImageSplit]] = None  # several images in one prompt: the chosen map split between them
    fallback_checks: Optional[List[Optional[MapCheck]]] = None  # the occlusion fallback's check where it was tried

    @property
    def scores(self) -> np.ndarray:
        """The deletion check's score of each chosen map, ``(B,)`` (NaN where every candidate was blank)."""
        return np.array([c.score for c in self.checks])

    def candidate_choice(self, image: int = 0) -> Tuple[int, int]:
        """``(m, l)``: the indices into :attr:`candidate_methods` and :attr:`candidate_layers` of the candidate the
        check ranked best on ``image`` (the chosen map, unless the occlusion fallback replaced it)."""
        checks = [c if c is not None and c.complete else None for row in self.candidate_checks[image] for c in row]
        return divmod(best_index(checks), len(self.candidate_layers))

    def gradient_layer(self, image: int = 0) -> Layer:
        """The chosen layer of ``image``, or where the occlusion fallback was chosen the layer of the gradient
        candidate the check ranked best: a layer any grad-cam method takes (``wrapper.layer(...)``)."""
        return self.candidate_layers[self.candidate_choice(image)[1]]

    def gradient_method(self, image: int = 0, method: Optional[str] = None) -> int:
        """The index into :attr:`candidate_methods` of ``method`` (default: the one chosen for ``image``, or where
        the occlusion fallback was chosen the candidate the check ranked best)."""
        method = method or self.methods[image]
        return self.candidate_choice(image)[0] if method == OCCLUSION else self.candidate_methods.index(method)

    def best_layer(self, image: int = 0, method: Optional[str] = None) -> Optional[Layer]:
        """The candidate layer whose map of ``method`` (default: the one chosen for ``image``, or the candidate the
        check ranked best where the occlusion fallback was chosen) passes the check with the highest total; ``None``
        when none passes."""
        checks = self.candidate_checks[image][self.gradient_method(image, method)]
        passing = [(check.total, i) for i, check in enumerate(checks) if check is not None and not check.partial
                   and not check.failed]
        return self.candidate_layers[max(passing)[1]] if passing else None

    def layer_warning(self, name: str, layer: Layer, image: int = 0) -> Optional[str]:
        """The warning line for the chosen method's map of ``image`` at candidate ``layer`` (``None`` when it passes
        the check), naming the layer that ranks best on the check when that is another; ``layer``
        :data:`~pytorch_grad_cam_vlm.layers.INPUT`: the chosen occlusion map's."""
        if layer == INPUT:
            return failure_warning(name, f"{OCCLUSION} at {layer_name(INPUT)}", self.checks[image])
        m = self.gradient_method(image)
        check = self.candidate_checks[image][m][self.candidate_layers.index(layer)]
        if check is None:
            return None
        best = self.best_layer(image)
        return failure_warning(name, f"{self.candidate_methods[m]} at {layer_name(layer)}", check,
                               layer_name(best) if best not in (None, layer) else None)

    def replaced_warning(self, name: str, image: int = 0) -> Optional[str]:
        """Where the occlusion fallback was kept for ``image``, the warning line of the gradient map it replaced
        (the candidate the check ranked best), which says why; ``None`` elsewhere."""
        return self.layer_warning(name, self.gradient_layer(image), image) if self.layers[image] == INPUT else None

    def fallback_warning(self, name: str, image: int = 0) -> Optional[str]:
        """Where the occlusion fallback was tried for ``image`` and failed its check too, its warning line (the
        gradient map stays, and no one need try occlusion at token resolution again); ``None`` elsewhere."""
        check = (self.fallback_checks or [None] * len(self.maps))[image]
        if check is None or self.layers[image] == INPUT:
            return None
        return failure_warning(name, f"the occlusion fallback ({OCCLUSION} at token resolution) tried in its place",
                               check)

    def fallback_lines(self, name: str, image: int = 0, gradient_drawn: bool = False) -> List[str]:
        """The lines the occlusion fallback adds beside the drawn maps' own warnings: the replaced gradient map's
        (:meth:`replaced_warning`, unless ``gradient_drawn``: that map is drawn with its own line) and the failed
        fallback's (:meth:`fallback_warning`); none where no fallback was tried."""
        lines = [self.fallback_warning(name, image)] + ([] if gradient_drawn else [self.replaced_warning(name, image)])
        return [line for line in lines if line]

    def warnings(self, names: Optional[Sequence[str]] = None) -> List[str]:
        """One line per image whose chosen map fails the check (no candidate passed), one per image where the
        occlusion fallback failed too (:meth:`fallback_warning`), one per image whose target hardly depends on the
        image (:class:`~pytorch_grad_cam_vlm.metrics.reliance.VisualReliance`), and for several images in one prompt
        one per image of the prompt that holds much of the map's mass while its part fails its check
        (:meth:`~pytorch_grad_cam_vlm.metrics.image_split.ImageSplit.warnings`); ``names`` name the inputs (default
        ``image 0``, ``image 1``, ...)."""
        names = names or [f"image {b}" for b in range(len(self.maps))]
        lines = [failure_warning(name, f"{method} at {layer_name(layer)}", check)
                 for name, method, layer, check in zip(names, self.methods, self.layers, self.checks)]
        lines += [self.fallback_warning(name, b) for b, name in enumerate(names)]
        lines += [reliance.warning(name) for name, reliance in zip(names, self.reliance or [])]
        lines += [line for name, split in zip(names, self.split or [])
                  for line in split.warnings([f"{name}, picture {i + 1}" for i in range(len(split.shares))])]
        return [line for line in lines if line]


def explain(wrapper: torch.nn.Module, x: Union[torch.Tensor, ImageInput, Sequence[ImageInput], MultiImage],
            targets: Optional[list] = None, method: MethodSpec = "auto", layers: LayerSpec = "auto",
            fractions: Sequence[float] = DEFAULT_FRACTIONS, fill: str = "mean", batch_size: Optional[int] = None,
            seed: int = 0, options: Optional[dict] = None,
            image_size: Optional[Union[Size, Sequence[Size]]] = None, choice: str = "staged",
            stage: Optional[Callable[[str], None]] = None, null: int = NULL_MAPS, split: bool = True,
            redraw: bool = True, fallback: Optional[bool] = None) -> Explanation:
    """Maps of ``x`` for ``targets`` (grad-cam targets, one per image; ``None``: the class the model predicts), from
    each candidate method at each candidate layer of ``wrapper.layers`` (and its projector), scored by the deletion
    check, the highest ``total`` per image kept.

    ``x``: the user's image (a path, a PIL image or a uint8 array) or a list of images of one size, preprocessed
    here; or normalised inputs ``(B, 3, H, W)`` as ``wrapper.preprocess`` makes them, with ``image_size`` ``(height,
    width)`` of the images they were made from (one for all, or one per input). ``maps`` lie on those images
    (without ``image_size``, a tensor is taken as the image itself), ``model_maps`` on the inputs
    (:func:`~pytorch_grad_cam_vlm.models.frame.prepare_images`). ``MultiImage([a, b])`` asks the images in one
    prompt, on one canvas (Qwen families, GLM-4V, InternVL, Idefics3, Gemma 3): ``maps`` lie on the canvas and
    ``split`` splits them between the images, each image's check with ``null`` null maps of its own; a canvas tensor
    the wrapper prepared (its ``image_boxes``) is split the same way, each part as it lies on the canvas.
    ``split=False`` leaves the split out (``split`` is ``None``): its checks cost ``(2 F + 1)(1 + null)`` forward
    images per image.

    ``method``: ``"auto"`` (:data:`AUTO_METHODS`), a method name or class, or a list. ``layers``: ``"auto"``
    (:func:`candidate_layers`), or any choice of :func:`~pytorch_grad_cam_vlm.methods.sweep.select_layers`
    (``"projector,2,5"``).
    ``fractions``, ``fill``, ``batch_size`` and ``seed`` go to the check. Each method runs one forward and one
    backward pass for all its layers, and methods that make their maps from one pass alone share it
    (:func:`~pytorch_grad_cam_vlm.methods.sweep.reads_one_pass`: the default's two). ``choice`` says which maps the
    check scores
    (:func:`~pytorch_grad_cam_vlm.methods.choice.choose_map`): ``"staged"`` every map that is not blank at the first
    fraction (2 forward images each) and one image per distinct peak, then the best :data:`~pytorch_grad_cam_vlm.
    methods.choice.STAGED_KEPT` at the other fractions; ``"full"`` every map at every fraction; ``"peak"`` the peak
    windows alone and the kept map in full (``--fast``). Each image's visual reliance (``reliance``,
    :func:`~pytorch_grad_cam_vlm.metrics.reliance.visual_reliance`) adds two images. ``options`` go to each
    method's constructor (a Smooth method's ``n_samples``, ...). ``stage``, when given, is called with ``"maps"``
    before the sweep passes and ``"check"`` before the check (a progress bar's label). ``null`` maps of no information
    (:func:`~pytorch_grad_cam_vlm.metrics.null.null_maps`) are checked once per image with the candidates,
    ``2 * F + 1`` images each, and each complete check's ``null_margin`` says how far its map beats them (0: none,
    and no ``"chance"`` verdict). ``redraw``: a method whose maps are random draws (RandomCAM, the Smooth methods:
    :func:`~pytorch_grad_cam_vlm.methods.catalog.draws_at_random`) runs a second time, and each of its checks records
    its map's correlation (Pearson) with the second draw (``stability``; ``"unstable"`` below
    :data:`~pytorch_grad_cam_vlm.metrics.map_check.STABILITY_FLOOR`; each image's part of a split map, its part's
    correlation); deterministic methods run once. ``fallback`` (default: with ``method="auto"`` only, so that a
    method asked by name gives its own maps): where the kept map fails its check and the target depends on the image,
    occlusion at token resolution (:func:`~pytorch_grad_cam_vlm.methods.choice.occlusion_fallback`: one image per
    window, at most 48, and ``2 F + 1``) replaces it if its map passes; ``fallback_checks[b]`` is its check where
    it was tried."""
    image_frames = None
    if isinstance(x, MultiImage):
        if image_size is not None:
            raise ValueError("image_size goes with preprocessed inputs (a tensor); a MultiImage's images carry their "
                             "sizes.")
        x, image_frames = prepare_several(wrapper, x)
    x, frames = prepare_images(wrapper, x, image_size)
    boxes = getattr(wrapper, "image_boxes", None) if split else None
    boxes = boxes if boxes is not None and boxes.canvas_size == tuple(x.shape[2:]) else None
    checked = checked_targets(targets, len(x))
    classes = candidate_methods(method)
    fallback = is_auto(method) if fallback is None else fallback
    n_layers, projector = len(wrapper.layers), has_projector(wrapper)
    if isinstance(layers, str) and layers.strip().lower() == "auto":
        chosen_layers = candidate_layers(n_layers, wrapper.last_layer_blank, projector)
    else:
        chosen_layers = select_layers(n_layers, layers, wrapper.last_layer_blank, projector)
    target_layers = layer_modules(wrapper, chosen_layers)
    maps, clean, redrawn = [], [None] * len(x), []
    if stage:
        stage("maps")
    source = None  # the last pass of a method that reads one pass alone, which the next such method reads too
    for cls in classes:
        constructor_options = cam_options(cls, wrapper, options or {})
        with layer_sweep(cls)(model=wrapper, target_layers=target_layers, **constructor_options) as cam:
            if source is not None and reads_one_pass(cls):
                maps.append(cam.maps_from(source, x, checked))
            else:
                maps.append(cam(input_tensor=x, targets=checked))
                source = cam.last_pass() if reads_one_pass(cls) else None
                if targets is None:  # grad-cam's own choice, read from the pass it made: the predicted class
                    targets = checked = [ClassifierOutputTarget(int(row.argmax())) for row in cam.outputs.detach()]
                if not is_smooth(cls):  # the clean image's target, from the same pass (a Smooth method's is noisy)
                    clean = [float(target(row)) for target, row in zip(targets, cam.outputs.detach())]
        redrawn.append(redrawn_maps(cls, wrapper, target_layers, constructor_options, x, checked)
                       if redraw and draws_at_random(cls) else None)
    source = None  # its activations and gradients are no longer needed
    candidate_maps = np.stack(maps, axis=1)  # (B, M, L, H, W)
    stability = np.stack([np.full(m.shape[:2], None) if again is None else
                          np.array([[pearson(a, b) for a, b in zip(*pair)] for pair in zip(m, again)])
                          for m, again in zip(maps, redrawn)], axis=1)  # (B, M, L): None where not redrawn
    names = [cls.__name__ for cls in classes]
    checks, chosen, reliance = [], [], []
    if stage:
        stage("check")
    for b in range(len(x)):
        index, flat = choose_map(wrapper, x[b:b + 1], candidate_maps[b].reshape(-1, *candidate_maps.shape[3:]),
                                 targets[b], choice, fractions, fill, batch_size, seed, clean[b], null,
                                 wrapper.token_cell if null else None)
        flat = [c if c is None or s is None else replace(c, stability=float(s))
                for c, s in zip(flat, stability[b].ravel())]
        reliance.append(visual_reliance(wrapper, x[b:b + 1], targets[b], clean[b], checks=flat))
        if reliance[-1].prompt_only:  # no map of an answer that comes from the prompt is "ok": the warning says why
            flat = [c if c is None else replace(c, prompt_only=True) for c in flat]
        checks.append([flat[m * len(chosen_layers):(m + 1) * len(chosen_layers)] for m in range(len(classes))])
        chosen.append(divmod(index, len(chosen_layers)))
    model_maps = np.stack([candidate_maps[b, m, l] for b, (m, l) in enumerate(chosen)])
    kept = [(names[m], chosen_layers[l], checks[b][m][l]) for b, (m, l) in enumerate(chosen)]
    fallback_checks: List[Optional[MapCheck]] = [None] * len(kept)
    for b, (_, _, check) in enumerate(kept):
        if fallback and check.failed and not reliance[b].prompt_only:
            cam, occluded = occlusion_fallback(wrapper, x[b:b + 1], targets[b], check, fractions, fill, batch_size,
                                               seed)
            fallback_checks[b] = occluded
            if not occluded.failed:
                model_maps[b], kept[b] = cam, (OCCLUSION, INPUT, occluded)
    splits = None if boxes is None else [
        split_map(wrapper, x[b:b + 1], model_maps[b], boxes, targets[b], image_frames, fractions, fill, batch_size,
                  seed, clean[b], null, wrapper.token_cell if null else None,
                  redrawn=None if redrawn[m] is None or kept[b][0] == OCCLUSION else redrawn[m][b, l],
                  prompt_only=reliance[b].prompt_only)
        for b, (m, l) in enumerate(chosen)]
    return Explanation(maps=np.stack([frame.to_image(m) for frame, m in zip(frames, model_maps)]),
                       methods=[k[0] for k in kept], layers=[k[1] for k in kept], checks=[k[2] for k in kept],
                       candidate_methods=names,
                       candidate_layers=chosen_layers, candidate_maps=candidate_maps, candidate_checks=checks,
                       targets=list(targets), model_maps=model_maps, frames=frames, reliance=reliance, split=splits,
                       fallback_checks=fallback_checks)


def redrawn_maps(cls: type, wrapper: torch.nn.Module, target_layers: list, options: dict, x: torch.Tensor,
                 targets: list) -> np.ndarray:
    """``(B, L, H, W)``: a second sweep of ``cls`` (a method that draws at random) over ``x`` (a Smooth method with a
    ``seed`` draws the second with ``seed + 1``), whose correlation with the first is each map's stability."""
    if options.get("seed") is not None:
        options = dict(options, seed=options["seed"] + 1)
    with layer_sweep(cls)(model=wrapper, target_layers=target_layers, **options) as cam:
        return cam(input_tensor=x, targets=targets)
