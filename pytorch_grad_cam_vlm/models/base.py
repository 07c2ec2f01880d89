"""What every model-family wrapper shares: images in, scores out, and the model left as it was."""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, List, Sequence, Tuple, Type

import numpy as np
import torch

from pytorch_grad_cam_vlm.layers import INPUT, PROJECTOR, Layer, has_projector, layer_modules
from pytorch_grad_cam_vlm.models.frame import ImageFrame
from pytorch_grad_cam_vlm.models.state import (Stage, eager_attention, explaining, graph_starts_at,
                                              has_forward_hooks, hookable_tuple_outputs, shallowest_hooked,
                                              stage_modules)


MAX_NORMALISED = 50.0  # |value| above which an input cannot be normalised pixels


class ModelWrapper(torch.nn.Module):
    """Base of the family adapters (:class:`QwenVLWrapper`, :class:`CLIPWrapper`).

    A subclass sets its layer lists and calls :meth:`_watch_layers`, and runs its model inside
    :meth:`_explaining`. While that runs, the model is in eval mode with frozen parameters and no autograd graph is
    built before the shallowest hooked layer (``efficient_gradients=False`` turns both off); afterwards its modes,
    ``requires_grad`` flags and hooks are as they were.
    """

    ablation_layer_type: Type[torch.nn.Module]  # what ablation_layer() returns
    refuses_fullgrad = True  # FullGrad needs Conv2d/BatchNorm2d biases: CNN classifiers have them, transformers not

    def __init__(self, model: torch.nn.Module, processor, efficient_gradients: bool = True) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.efficient_gradients = efficient_gradients
        image_processor = processor.image_processor
        self.register_buffer("image_mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1), False)
        self.batch_size = 0  # of the latest forward pass, read by reshape_transform

    @property
    def input_device(self) -> torch.device:
        raise NotImplementedError

    @property
    def layers(self) -> List[torch.nn.Module]:
        """The layers that layer choices index: a VLM's decoder layers, a CLIP model's vision layers."""
        raise NotImplementedError

    def layer(self, choice: Layer) -> torch.nn.Module:
        """The module of a layer choice as :func:`~pytorch_grad_cam_vlm.explain` names it in ``result.layers``: an
        index into :attr:`layers`, or ``"projector"`` on a vision-language model; e.g.
        ``SmoothGradCAM(model=wrapper, target_layers=[wrapper.layer(result.gradient_layer())], ...)``."""
        count, projector = len(self.layers), has_projector(self)
        if isinstance(choice, str) and choice == INPUT:
            raise ValueError("Layer 'input' is the occlusion fallback's (explain kept occlusion there): it has no "
                             "module. For a gradient method, take result.gradient_layer(), the layer of the gradient "
                             "map the check ranked best.")
        index = isinstance(choice, (int, np.integer)) and not isinstance(choice, bool)
        if not (index and -count <= choice < count) and not (projector and choice == PROJECTOR):
            raise ValueError(f"Unknown layer choice {choice!r}: use an index into wrapper.layers (0..{count - 1}, or "
                             f"negative from the end){' or ' + repr(PROJECTOR) if projector else ''}, as "
                             "explain's result.layers names them.")
        return layer_modules(self, [choice])[0]

    @property
    def last_layer_blank(self) -> bool:
        """Whether the last of :attr:`layers` gets no gradient at the image positions (its gradient maps are
        blank): layer choices leave it out."""
        raise NotImplementedError

    @property
    def token_cell(self) -> int:
        """The side in pixels of the image area one token covers: image sizes are multiples of it, and the
        pointing game's tolerance is half of it."""
        return self.patch_size

    def _watch_layers(self, *parents: torch.nn.Module) -> None:
        """Remember the layers (see :meth:`_restore_layers`) and anchor grad-cam's input device: grad-cam moves
        inputs to the device of the wrapper's first parameter, and with accelerate offloading the model's first
        parameter may live on "meta", so the wrapper leads with an empty one on the input device."""
        self.input_anchor = torch.nn.Parameter(torch.empty(0, device=self.input_device), requires_grad=False)
        self._originals = []
        self._watch_children(*parents)

    def _watch_children(self, *parents: torch.nn.Module) -> None:
        """Remember the direct children of each of ``parents`` (a ``ModuleList``'s layers, or a module's named
        submodules such as a vision encoder's merger), to put back any that AblationCAM leaves replaced."""
        self._originals += [(parent, dict(parent._modules)) for parent in parents]

    def _replaced_layers(self) -> list:
        """``(parent, name, original)`` of each watched layer that another module stands in for."""
        return [(parent, name, original) for parent, children in self._originals
                for name, original in children.items() if parent._modules.get(name) is not original]

    def _put_back_layers(self) -> None:
        """Put every watched layer back in its place."""
        for parent, name, original in self._replaced_layers():
            parent._modules[name] = original

    def image_frame(self, image_size: Tuple[int, int], input_size: Tuple[int, int]) -> ImageFrame:
        """Where the input that :meth:`preprocess` makes of an image of ``image_size`` lies on that image: an
        :class:`~pytorch_grad_cam_vlm.models.frame.ImageFrame`, whose ``to_image(maps)`` carries maps ``(..., H,
        W)`` on the input (``input_size``, ``x.shape[2:]``) onto the image ``(..., H0, W0)``. Sizes are ``(height,
        width)``, as numpy shapes (PIL's ``image.size`` is ``(width, height)``).

        The contract for a family's wrapper: the frame undoes exactly what the family's ``preprocess`` does to the
        image (resize, letterbox, tiles, crops), so that a map hot on one token cell of the input lands on the image
        region whose pixels the processor put in that cell (``tests/models/test_frames.py`` checks it within half a
        cell on every family); image pixels the input does not show (a center crop) come out NaN; the wrapper's own
        state (a ``source_size``) is neither read nor changed. This default is for a ``preprocess`` that stretches
        the whole image onto the whole input; families that letterbox, crop or tile override it."""
        return ImageFrame.resized(image_size, input_size)

    def to_rgb(self, x: torch.Tensor) -> np.ndarray:
        """Undo the normalisation: ``(B, 3, H, W)`` to ``(B, H, W, 3)`` float32 in [0, 1], for overlays."""
        rgb = x.detach().float().cpu() * self.image_std.cpu() + self.image_mean.cpu()
        return rgb.clamp(0, 1).permute(0, 2, 3, 1).numpy()

    def clip_to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``x`` clipped to the normalised pixel range (0..1 before normalisation), as a processor's
        resize of uint8 pixels clips its overshoot."""
        mean, std = self.image_mean.to(x), self.image_std.to(x)
        return torch.maximum(torch.minimum(x, (1 - mean) / std), -mean / std)

    def train(self, mode: bool = True) -> "ModelWrapper":
        """Only the wrapper's own flag: grad-cam calls ``.eval()`` on its model, and the wrapped model keeps its
        mode (each forward pass runs it in eval mode and restores the mode after)."""
        self.training = mode
        return self

    @contextmanager
    def eager_attention(self) -> Iterator[None]:
        """Run the model with eager attention inside the block (for attention weights and second derivatives)."""
        with eager_attention(self.model):
            yield

    # ----------------------------------------------------------------------------------------- checks
    def _check_images(self, x: torch.Tensor, multiple: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Expected normalised images of shape (B, 3, H, W), got {shape}; "
                             "use wrapper.preprocess(image) to make one.")
        if not x.is_floating_point():
            raise ValueError(f"Expected normalised float images, got dtype {x.dtype} (raw pixels?); use "
                             "wrapper.preprocess(image) to make them.")
        check_size(x.shape[2], x.shape[3], multiple)
        finite = torch.isfinite(x.detach())
        if not bool(finite.all()):
            raise ValueError(f"The images hold {int((~finite).sum())} NaN or infinite values: maps of them would be "
                             "NaN. Make the image from finite pixels with wrapper.preprocess(image).")
        # Normalised pixels lie within a few units of 0 (SmoothGrad's noise included); 0..255 values do not.
        if bool(x.detach().abs().amax() > MAX_NORMALISED):
            raise ValueError(f"Image values reach {float(x.detach().abs().amax()):.4g}, far outside normalised "
                             "pixels (about -2..2.5): these look like raw 0..255 pixels; use wrapper.preprocess(image).")

    def ablation_layer(self) -> torch.nn.Module:
        """An ablation layer for grad-cam's AblationCAM on decoder layers, an :attr:`ablation_layer_type` of this
        wrapper: it zeroes one channel at the image tokens' positions (a tiled family's: its ``view``'s).
        ``AblationCAM(model=wrapper, ..., ablation_layer=wrapper.ablation_layer())``."""
        return self.ablation_layer_type(self)

    def _restore_layers(self) -> None:
        """grad-cam's AblationCAM swaps a layer for its ablation layer and, when that layer fails (an IndexError,
        which grad-cam's ``with`` block swallows), leaves it inside the model: put the original layers back and say
        what to use instead."""
        foreign = [parent._modules.get(name) for parent, name, _ in self._replaced_layers()
                   if not isinstance(parent._modules.get(name), self.ablation_layer_type)]
        if foreign:
            self._put_back_layers()
            raise ValueError(
                f"A {type(foreign[0]).__name__} had replaced a layer of the model (grad-cam's AblationCAM leaves "
                "it there when its ablation layer fails on transformer layers); the original layers are back. "
                "Use AblationCAM(..., ablation_layer=wrapper.ablation_layer()).")

    def _warn_if_hooked(self, layer: torch.nn.Module, why: str) -> None:
        """Warn when a gradient method targets ``layer``, whose image outputs get no gradient."""
        if torch.is_grad_enabled() and has_forward_hooks(layer):
            warnings.warn(why, stacklevel=5)

    # ----------------------------------------------------------------------------------------- forward
    @contextmanager
    def _explaining(self, x: torch.Tensor, stages: Sequence[Stage]) -> Iterator[torch.Tensor]:
        """Around the model call of a forward pass: checks, eval mode, frozen parameters and the autograd graph
        started at the shallowest hooked stage (``stages`` in execution order; a stage is a module or a group of
        modules started by its first one, see :func:`~pytorch_grad_cam_vlm.models.state.stage_modules`). Yields the
        input to use (one that requires grad when a hooked module lies outside the stages: with frozen parameters
        only the input can put it in a graph)."""
        self._restore_layers()
        if x.requires_grad and self.refuses_fullgrad:
            _refuse_fullgrad()
        start = None
        if self.efficient_gradients and not x.requires_grad:
            start = shallowest_hooked(stages, self.model)
            if start is None and torch.is_grad_enabled() and has_forward_hooks(self.model):
                x = x.detach().requires_grad_(True)
        with explaining(self.model, self.efficient_gradients), graph_starts_at(start), \
                hookable_tuple_outputs([module for stage in stages for module in stage_modules(stage)]):
            yield x


class DecoderLayers:
    """The layer lists of a wrapper around a language decoder (``self._decoder_layers``): what layer choices index,
    and which layers attention maps can read."""

    _decoder_layers: torch.nn.ModuleList

    @property
    def decoder_layers(self) -> List[torch.nn.Module]:
        """The language decoder's layers. The last one's outputs at the image positions get no gradient."""
        return list(self._decoder_layers)

    @property
    def layers(self) -> List[torch.nn.Module]:
        """The decoder layers, which layer choices (``"auto"``, ``"3,5"``) index."""
        return self.decoder_layers

    @property
    def last_layer_blank(self) -> bool:
        """True: the last decoder layer's image positions reach the next-token logits through nothing."""
        return True

    def _warn_if_last_layer_hooked(self) -> None:
        """Warn when a gradient method targets the last decoder layer, whose image outputs get no gradient."""
        self._warn_if_hooked(self._decoder_layers[-1], (
            "The last decoder layer's outputs at the image positions reach the next-token logits through nothing, "
            "so their gradient is exactly zero and gradient-based maps there are blank. Use "
            f"wrapper.decoder_layers[-2] (layer {len(self._decoder_layers) - 2}) or an earlier layer, or "
            "explain(wrapper, x) to choose one by the deletion check."))

    def _stages(self) -> list:
        """The model's stages in execution order, where the autograd graph may start (see ``_explaining``): the
        vision blocks, the projector, the decoder layers."""
        return self.vision_blocks + [self.projector] + self.decoder_layers

    @property
    def full_attention_layers(self) -> List[int]:
        """Indices of the decoder layers with softmax attention, whose weights attention maps read: every layer of
        most models; Qwen3.5 puts linear-attention (Gated DeltaNet) layers between them."""
        return [i for i, layer in enumerate(self._decoder_layers) if hasattr(layer, "self_attn")]


def check_size(height: int, width: int, multiple: int) -> None:
    """Refuse an input size that is not made of whole token cells of ``multiple`` pixels."""
    if height % multiple or width % multiple:
        raise ValueError(f"Image height and width must be multiples of {multiple} pixels, got {height}x{width}; "
                         "use wrapper.preprocess(image) to resize as the model does.")


def find_module_list(model: torch.nn.Module, sibling: str) -> Tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The first ``ModuleList`` whose parent also has attribute ``sibling``; found by walking the model, so that
    module paths that moved between transformers versions (``model.model.layers`` vs
    ``model.model.language_model.layers``, ``model.visual`` vs ``model.model.visual``) all work."""
    for parent in model.modules():
        if hasattr(parent, sibling):
            for child in parent.children():
                if isinstance(child, torch.nn.ModuleList) and len(child) > 0:
                    return parent, child
    raise ValueError(f"Found no layer list beside a '{sibling}' module in {type(model).__name__}: "
                     "is this a supported model?")


def _refuse_fullgrad() -> None:
    """grad-cam's FullGrad takes biases from Conv2d and BatchNorm2d layers only; a transformer has none, and FullGrad
    would silently return |input gradient x input| under its name."""
    from pytorch_grad_cam import FullGrad

    frame = sys._getframe(2)
    for _ in range(10):
        if frame is None:
            return
        if isinstance(frame.f_locals.get("self"), FullGrad):
            raise NotImplementedError(
                "FullGrad is not supported on vision-language models: it sums bias gradients of Conv2d/BatchNorm2d "
                "layers, which transformers do not have, and would return only |input gradient x input|. Use "
                "GradCAM, HiResCAM or LayerCAM on the wrapper's layers, or SmoothGradCAM.")
        frame = frame.f_back
