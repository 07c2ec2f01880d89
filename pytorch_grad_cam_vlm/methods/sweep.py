"""One-pass layer sweeps: a separate map for each of many target layers from one forward and one backward pass,
and the named layer choices (``auto``, ``early``, ``middle``, ``late``, ``all``, ``"3,5,7"``, ``projector``) of the
CLI."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Sequence, Type, Union

import numpy as np
from pytorch_grad_cam.utils.image import scale_cam_image

from pytorch_grad_cam_vlm.layers import PROJECTOR, Layer

LayerSpec = Union[str, int, Sequence[Layer]]
LAYER_PRESETS = ("auto", "early", "middle", "late", "all")
AUTO_LAYER_COUNT = 6
# grad-cam methods whose map is a function of one forward and one backward pass's activations and gradients at the
# target layers (and the targets): several of them need only one pass (LayerSweep.maps_from). Not the Smooth methods
# (noisy passes), RandomCAM (a draw), ScoreCAM/AblationCAM/FinerCAM (more passes) or ShapleyCAM (a second-order pass).
ONE_PASS_METHODS = frozenset({"GradCAM", "GradCAMPlusPlus", "XGradCAM", "GradCAMElementWise", "HiResCAM", "LayerCAM",
                              "EigenGradCAM"})


def reads_one_pass(method_cls: Type) -> bool:
    """Whether ``method_cls`` (or its sweep) makes its map from one pass's activations and gradients alone
    (:data:`ONE_PASS_METHODS`), so that it can read a pass another such method made."""
    named = next(c for c in method_cls.__mro__ if not issubclass(c, LayerSweep))  # a sweep's grad-cam class
    return named.__name__ in ONE_PASS_METHODS and named.__module__.startswith("pytorch_grad_cam.")


@dataclass
class SweepPass:
    """What one sweep's forward and backward pass left (:meth:`LayerSweep.last_pass`): the target layers'
    activations and gradients after the reshape transform, the order the layers ran in, and the outputs."""

    method: Type
    model: object
    target_layers: list
    reshape_transform: object
    activations: list
    gradients: list
    run_order: list
    outputs: object


class LayerSweep:
    """Mixin for a grad-cam method: ``cam(x, targets)`` returns one map per target layer, ``(B, L, H, W)`` in the
    order of ``target_layers``, where grad-cam would return their mean ``(B, H, W)``.

    grad-cam already computes a map per layer (``compute_cam_per_layer``) from one forward and one backward pass;
    only the final mean is replaced. Each layer's map is scaled to [0, 1] as grad-cam scales a single-layer result,
    so ``maps[:, i]`` equals a call with ``target_layers=[target_layers[i]]``.
    Use it first among the bases, ``class GradCAMSweep(LayerSweep, GradCAM)``, or build it with :func:`layer_sweep`.
    Target layers must be listed in the order the model runs them (grad-cam pairs activations with layers by
    position); a call with another order raises a ``ValueError``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        try:
            check_sweep(type(self), len(self.target_layers))
            if len({id(layer) for layer in self.target_layers}) != len(self.target_layers):
                raise ValueError("A layer sweep needs each target layer once; remove the repeated layers.")
        except ValueError:
            self.activations_and_grads.release()
            raise
        self._fold_layers_into_batch = False
        self._run_order: List = []
        run_order, n_layers = self._run_order, len(self.target_layers)

        def record_run_order(module, args, output) -> None:
            # The first pass only (methods may run more). A closure, not a bound method, so that the hook does not
            # keep an unreleased cam alive (grad-cam releases its hooks when the cam is collected).
            if len(run_order) < n_layers:
                run_order.append(module)

        # Removed with grad-cam's own hooks by activations_and_grads.release().
        self.activations_and_grads.handles += [layer.register_forward_hook(record_run_order)
                                               for layer in self.target_layers]

    def forward(self, *args, **kwargs) -> np.ndarray:
        self._run_order.clear()
        return super().forward(*args, **kwargs)

    def last_pass(self) -> "SweepPass":
        """What this sweep's latest pass left (activations, gradients, layer order, outputs), kept past the release
        of its hooks, for :meth:`maps_from`."""
        grads = self.activations_and_grads
        return SweepPass(type(self), self.model, list(self.target_layers), self.reshape_transform,
                         list(grads.activations), list(grads.gradients), list(self._run_order), self.outputs)

    def maps_from(self, source: "SweepPass", input_tensor, targets: list) -> np.ndarray:
        """This method's maps ``(B, L, H, W)`` of ``input_tensor`` from the pass another sweep of the same model and
        target layers made of it for ``targets`` (its :meth:`last_pass`), with no pass of its own: both methods must
        make their maps from one pass alone (:func:`reads_one_pass`). Equal to ``self(input_tensor, targets)``."""
        if not (reads_one_pass(type(self)) and reads_one_pass(source.method)):
            raise ValueError(f"{type(self).__name__} cannot read {source.method.__name__}'s pass: both must make "
                             f"their maps from one pass alone ({', '.join(sorted(ONE_PASS_METHODS))}).")
        if [id(layer) for layer in source.target_layers] != [id(layer) for layer in self.target_layers] \
                or source.model is not self.model or source.reshape_transform != self.reshape_transform:
            raise ValueError("maps_from reads a pass of the same model, target layers and reshape transform.")
        self.activations_and_grads.activations = list(source.activations)
        self.activations_and_grads.gradients = list(source.gradients)
        self._run_order[:] = source.run_order
        self.outputs = source.outputs
        return self.aggregate_multi_layers(self.compute_cam_per_layer(input_tensor.to(self.device), targets, False))

    def aggregate_multi_layers(self, cam_per_target_layer: List[np.ndarray]) -> np.ndarray:
        self._check_run_order()
        maps = np.maximum(np.concatenate(cam_per_target_layer, axis=1), 0)
        maps = scale_cam_image(maps.reshape(-1, *maps.shape[2:])).reshape(maps.shape)
        return maps.reshape(-1, *maps.shape[2:]) if self._fold_layers_into_batch else maps

    def forward_augmentation_smoothing(self, input_tensor, targets, eigen_smooth: bool = False) -> np.ndarray:
        """grad-cam's ``aug_smooth``: it de-augments each result as a ``(B, 1, H, W)`` image with ttach, so the
        layers travel folded into the batch axis through it and are unfolded after."""
        self._fold_layers_into_batch = True
        try:
            maps = super().forward_augmentation_smoothing(input_tensor, targets, eigen_smooth)
        finally:
            self._fold_layers_into_batch = False
        return maps.reshape(input_tensor.shape[0], len(self.target_layers), *maps.shape[1:])

    def _check_run_order(self) -> None:
        ran = {id(module) for module in self._run_order}
        missing = [i for i, layer in enumerate(self.target_layers) if id(layer) not in ran]
        if missing:
            raise ValueError(f"Target layers {missing} did not run in the forward pass; pass layers of this model.")
        if any(a is not b for a, b in zip(self._run_order, self.target_layers)):
            order = [next(i for i, layer in enumerate(self.target_layers) if layer is module)
                     for module in self._run_order]
            raise ValueError("List the target layers of a sweep in the order the model runs them (grad-cam pairs "
                             f"activations with layers by position): reorder them as positions {order}.")


def check_sweep(method_cls: Type, n_layers: int) -> None:
    """Refuse a sweep that a method cannot do in one pass: grad-cam's ShapleyCAM frees the autograd graph in its
    first layer's Hessian-vector product, so a second target layer fails (with or without a sweep)."""
    from pytorch_grad_cam import ShapleyCAM

    if issubclass(method_cls, ShapleyCAM) and n_layers > 1:
        raise ValueError(f"{method_cls.__name__} takes one target layer per call (grad-cam's ShapleyCAM frees the "
                         "graph after the first layer's Hessian-vector product): explain one layer at a time.")


@lru_cache(maxsize=None)
def layer_sweep(method_cls: Type) -> Type:
    """The sweep variant of a grad-cam method class: ``layer_sweep(GradCAM)`` is ``class GradCAMSweep(LayerSweep,
    GradCAM)``. Works for every method built on ``BaseCAM``, the Smooth ones of this package included."""
    if issubclass(method_cls, LayerSweep):
        return method_cls
    if not hasattr(method_cls, "aggregate_multi_layers"):
        raise TypeError(f"{method_cls.__name__} does not aggregate target layers like grad-cam's BaseCAM; "
                        "a layer sweep needs a BaseCAM method such as GradCAM.")
    doc = f"{method_cls.__name__} with one map per target layer, ``(B, L, H, W)``; see :class:`LayerSweep`."
    return type(f"{method_cls.__name__}Sweep", (LayerSweep, method_cls), {"__doc__": doc,
                                                                           "__module__": __name__})


def select_layers(n_layers: int, spec: LayerSpec, skip_last: bool = True, projector: bool = False) -> List[Layer]:
    """Layers out of ``n_layers`` layers for ``spec``, in the order the model runs them:

    - ``"all"``: every usable layer; ``"early"``, ``"middle"``, ``"late"``: the first, second and last third of them;
    - ``"auto"``: 6 layers spread evenly over the usable depth, first and last usable layer included (all of them
      when there are fewer);
    - a list of indices or a string ``"3,5,7"``; negative indices count from the end. With ``projector`` (a model
      with :attr:`projector`), the list may name :data:`PROJECTOR`, which comes first.

    ``skip_last`` (gradient methods on Qwen's decoder layers or CLIP's vision layers): the last layer's outputs at
    the image positions get exactly zero gradient, so its map is blank. Presets leave it out; naming it raises a
    ``ValueError``.
    """
    usable = n_layers - 1 if skip_last else n_layers
    if usable < 1:
        raise ValueError(f"A model with {n_layers} layer(s) has no layer usable for gradient methods.")
    if isinstance(spec, str) and spec.strip().lower() in LAYER_PRESETS:
        preset = spec.strip().lower()
        if preset == "all":
            return list(range(usable))
        if preset == "auto":
            return sorted({int(round(i)) for i in np.linspace(0, usable - 1, min(AUTO_LAYER_COUNT, usable))})
        position = ("early", "middle", "late").index(preset)
        third = np.array_split(np.arange(usable), 3)[position]
        # With fewer than 3 usable layers a third can be empty: take the layer nearest to it.
        return [int(i) for i in third] if len(third) else [min(usable - 1, position)]
    indices = _parse_indices(spec)
    if not indices:
        _bad_spec(spec)
    named = [i for i in indices if i == PROJECTOR]
    if named and not projector:
        raise ValueError(f"Layer choice {spec!r} names the {PROJECTOR}, which this model or command does not offer "
                         "as a layer: pass layer indices.")
    if len(named) > 1:
        raise ValueError(f"Layer list {list(indices)} names the {PROJECTOR} twice.")
    indices = [i for i in indices if i != PROJECTOR]
    resolved = []
    for index in indices:
        if not -n_layers <= index < n_layers:
            raise ValueError(f"Layer {index} does not exist: the model has layers 0..{n_layers - 1}.")
        resolved.append(index % n_layers)
    if skip_last and n_layers - 1 in resolved:
        raise ValueError(f"Layer {n_layers - 1} is the last layer: its outputs at the image positions get exactly "
                         f"zero gradient, so gradient maps there are blank. Use layers 0..{usable - 1}.")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"Layer list {list(indices)} names a layer twice.")
    return named + sorted(resolved)


def _parse_indices(spec: LayerSpec) -> List[Layer]:
    if isinstance(spec, (int, np.integer)):
        return [int(spec)]
    parts = spec.split(",") if isinstance(spec, str) else spec
    try:
        return [PROJECTOR if isinstance(part, str) and part.strip().lower() == PROJECTOR else int(part)
                for part in parts]
    except (TypeError, ValueError):
        _bad_spec(spec)


def _bad_spec(spec) -> None:
    raise ValueError(f"Unknown layer choice {spec!r}: use one of {', '.join(LAYER_PRESETS)} or a list of "
                     f"layer indices such as 3,5,7 (on a vision-language model, {PROJECTOR} too).")


# Relative depth of the layer that `auto_layer` picks: GradCAM's best pointing layer on the demo model, decoder layer 0
# of layers 0..3 (40 held-out samples: pointing 0.700 / distractor 0.175 at layer 0, 0.675 / 0.250 at layer 1,
# 0.275 / 0.475 at layer 2).
AUTO_LAYER_DEPTH = 0.0


def auto_layer(wrapper) -> int:
    """The demo model's best fixed GradCAM layer, as a relative depth (:data:`AUTO_LAYER_DEPTH`), never the last
    layer. A fixed depth does not transfer between models (benchmarks/auto_layer.md): to choose a layer for an image,
    use :func:`pytorch_grad_cam_vlm.explain`, which scores every candidate layer's map with the deletion check."""
    n = len(wrapper.decoder_layers)
    if n < 2:
        raise ValueError("The model has a single decoder layer, whose image positions get no gradient: use a vision "
                         "block (wrapper.vision_blocks[-1]) or the merger as target layer.")
    return min(n - 2, int(round(AUTO_LAYER_DEPTH * (n - 1))))


