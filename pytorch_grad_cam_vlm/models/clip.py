"""CLIP, SigLIP and SigLIP 2 adapter: a ``torch.nn.Module`` that maps normalised images to image-text logits for a
fixed list of texts, so that every grad-cam method, target and metric runs on it unchanged."""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pytorch_grad_cam.ablation_layer import AblationLayerVit
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.models.state import explaining
from pytorch_grad_cam_vlm.models.base import ModelWrapper
from pytorch_grad_cam_vlm.models.frame import ImageFrame, processor_frame

# Tokens before the patch tokens in the vision tower's sequence: CLIP's class token; SigLIP has none.
PREFIX_TOKENS = {"clip": 1, "siglip": 0, "siglip2": 0}

# How each family's texts were padded in training: CLIP pools at its end-of-text token, so padding does not
# matter; SigLIP pools at the last position and was trained on texts padded to the tokenizer's maximum length.
# SigLIP 2's processor pads to 64 tokens by itself.
DEFAULT_TEXT_KWARGS = {"clip": {"padding": True, "truncation": True},
                       "siglip": {"padding": "max_length", "truncation": True},
                       "siglip2": {}}


def find_vision_tower(model: torch.nn.Module) -> Tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The vision transformer (the module with patch ``embeddings`` and an ``encoder``) and its layer list,
    found by walking the model."""
    for module in model.modules():
        embeddings = getattr(module, "embeddings", None)
        encoder = getattr(module, "encoder", None)
        if hasattr(embeddings, "patch_embedding") and encoder is not None:
            for child in encoder.children():
                if isinstance(child, torch.nn.ModuleList) and len(child) > 0:
                    return module, child
    raise ValueError(f"Found no vision encoder with patch embeddings in {type(model).__name__}: "
                     "is this a CLIP, SigLIP or SigLIP 2 model?")


class VitTokenAblationLayer(AblationLayerVit):
    """grad-cam's ``AblationLayerVit``, callable the way transformers calls an encoder layer:
    ``layer(hidden_states, attention_mask, **kwargs)`` (grad-cam's takes the hidden states alone)."""

    def __call__(self, x, *args, **kwargs):
        return super().__call__(x)


class CLIPWrapper(ModelWrapper):
    """CLIP, SigLIP or SigLIP 2 as an image classifier over ``texts``, for grad-cam.

    ``forward(x)`` takes normalised images ``(B, 3, H, W)`` (as :meth:`preprocess` makes them; height and width
    multiples of the patch size) and returns the model's own image-text logits ``(B, len(texts))`` float32:
    ``logit_scale.exp() * cos(image, text)`` (``+ logit_bias`` for SigLIP), the model's ``logits_per_image``.
    The text embeddings are computed once, here. Target a text with :meth:`target` (by index or by text).
    :meth:`reshape_transform` turns the outputs of :attr:`vision_layers` into ``(B, C, h, w)`` maps on the patch
    grid of the latest input (CLIP's class token dropped).

    CLIP and SigLIP interpolate their position embeddings for sizes other than the trained one; SigLIP 2 resizes
    them for any grid. While a forward pass runs, the model is in eval mode with frozen parameters and no autograd
    graph is built before the shallowest hooked layer (``efficient_gradients=False`` turns both off); afterwards
    its modes, ``requires_grad`` flags and hooks are as they were.
    """

    ablation_layer_type = VitTokenAblationLayer

    def __init__(self, model: torch.nn.Module, processor, texts: Sequence[str], efficient_gradients: bool = True,
                 text_kwargs: Optional[Dict] = None) -> None:
        self.family = getattr(model.config, "model_type", None)
        if self.family not in PREFIX_TOKENS:
            raise ValueError(f"CLIPWrapper supports model types {', '.join(PREFIX_TOKENS)}, got {self.family!r}; "
                             "load the model with transformers.AutoModel.")
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError(f"Pass texts as a non-empty list of non-empty strings, got {texts!r}.")
        if len(set(texts)) != len(texts):
            raise ValueError(f"The texts must be distinct, got {list(texts)!r}.")
        if len(texts) == 1 and self.family == "clip":
            warnings.warn("CLIP with one text: its softmax over the texts is 1.0 whatever the image, so the predicted "
                          "probability says nothing; the maps explain the image-text similarity logit. Give two or "
                          "more texts to compare.", stacklevel=2)
        super().__init__(model, processor, efficient_gradients)
        self.texts = list(texts)
        self.text_kwargs = dict(DEFAULT_TEXT_KWARGS[self.family] if text_kwargs is None else text_kwargs)
        vision_config = model.config.vision_config
        self.patch_size = int(vision_config.patch_size)
        self.image_size = getattr(vision_config, "image_size", None)  # SigLIP 2 has no trained size
        self.prefix_tokens = PREFIX_TOKENS[self.family]
        self.vision_tower, self._vision_layers = find_vision_tower(model)
        self._watch_layers(self._vision_layers)
        self.register_buffer("text_embeds", self._embed_texts(), False)
        self.grid: Optional[Tuple[int, int]] = None  # patch grid of the latest forward pass

    # ----------------------------------------------------------------------------------------- layers
    @property
    def vision_layers(self) -> List[torch.nn.Module]:
        """The vision encoder's transformer layers. For CLIP the last one's patch outputs get no gradient (only
        the class token is pooled): use ``vision_layers[-2]`` there."""
        return list(self._vision_layers)

    @property
    def layers(self) -> List[torch.nn.Module]:
        """The vision layers, which layer choices index."""
        return self.vision_layers

    @property
    def last_layer_blank(self) -> bool:
        """CLIP pools its class token, so the last layer's patch outputs get no gradient; SigLIP pools every
        patch."""
        return self.family == "clip"

    @property
    def input_device(self) -> torch.device:
        return self.vision_tower.embeddings.patch_embedding.weight.device

    # ----------------------------------------------------------------------------------------- images
    def preprocess(self, image: ImageInput, **images_kwargs) -> torch.Tensor:
        """The processor's own resize and normalisation, as ``(1, 3, H, W)`` float32 on the CPU. Accepts a path,
        a PIL image or a uint8 array. ``images_kwargs`` go to the processor, e.g. ``size={"height": 448,
        "width": 448}, do_center_crop=False`` for another resolution, or ``max_num_patches=...`` for SigLIP 2."""
        encoded = self.processor(images=[load_rgb(image)], return_tensors="pt", **images_kwargs)
        pixel_values = encoded["pixel_values"].float()
        if self.family != "siglip2":
            return pixel_values
        # SigLIP 2 returns raster-ordered (p, p, C) patches padded to max_num_patches; undo that.
        h, w = (int(v) for v in encoded["spatial_shapes"][0])
        p = self.patch_size
        patches = pixel_values[0, :h * w].reshape(h, w, p, p, 3)
        return patches.permute(4, 0, 2, 1, 3).reshape(1, 3, h * p, w * p)

    def image_frame(self, image_size: Tuple[int, int], input_size: Tuple[int, int]) -> ImageFrame:
        """Where the input lies on the image (see :meth:`ModelWrapper.image_frame`): CLIP's processor resizes the
        shorter side and center-crops (the rest of the image is not seen); SigLIP's and SigLIP 2's resize the whole
        image (SigLIP 2 keeping its aspect ratio on whole patches). An input made with other ``images_kwargs``
        than the processor's (``do_center_crop=False``, another ``size``) is taken as a plain resize."""
        return processor_frame(self.processor.image_processor, image_size, input_size)

    # ----------------------------------------------------------------------------------------- texts
    def text_index(self, text: str) -> int:
        """The logit column of ``text``."""
        if text not in self.texts:
            raise ValueError(f"{text!r} is not one of the wrapper's texts {self.texts}; pass it in texts=[...].")
        return self.texts.index(text)

    def target(self, text: Union[str, int]) -> ClassifierOutputTarget:
        """A grad-cam target for one text, given as the text itself or as its index in ``texts``."""
        if isinstance(text, str):
            return ClassifierOutputTarget(self.text_index(text))
        if not isinstance(text, (int, np.integer)) or not -len(self.texts) <= text < len(self.texts):
            raise ValueError(f"Text index {text!r} is out of range for {len(self.texts)} texts.")
        return ClassifierOutputTarget(int(text) % len(self.texts))

    def _embed_texts(self) -> torch.Tensor:
        inputs = self.processor(text=self.texts, return_tensors="pt", **self.text_kwargs)
        inputs = {k: v.to(self.input_device) for k, v in inputs.items()}
        with torch.no_grad(), explaining(self.model):
            embeds = _pooled(self.model.get_text_features(**inputs))
        return (embeds / embeds.norm(p=2, dim=-1, keepdim=True)).float()

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x, self.token_cell)
        b, _, height, width = x.shape
        self.grid, self.batch_size = (height // self.patch_size, width // self.patch_size), b
        if self.prefix_tokens:
            self._warn_if_hooked(self._vision_layers[-1], (
                "CLIP pools only the class token of its last vision layer, so that layer's patch outputs reach the "
                "logits through nothing: their gradient is exactly zero and gradient-based maps there are blank. "
                f"Use wrapper.vision_layers[-2] (layer {len(self._vision_layers) - 2})."))
        with self._explaining(x, self.vision_layers) as x:
            image_embeds = _pooled(self._image_features(x.to(self.input_device))).float()
            image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
            logits = image_embeds @ self.text_embeds.to(image_embeds.device).t() * self.model.logit_scale.exp().float()
            if self.family != "clip":
                logits = logits + self.model.logit_bias.float()
        return logits

    def _image_features(self, x: torch.Tensor):
        if self.family != "siglip2":
            resized = self.image_size is not None and tuple(x.shape[2:]) != (self.image_size, self.image_size)
            return self.model.get_image_features(pixel_values=x, interpolate_pos_encoding=resized)
        # SigLIP 2 takes raster-ordered patches of (p, p, C) values and resizes its position grid to (h, w).
        b, (h, w), p = x.shape[0], self.grid, self.patch_size
        patches = x.reshape(b, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * 3)
        return self.model.get_image_features(
            pixel_values=patches, pixel_attention_mask=torch.ones(b, h * w, dtype=torch.long, device=x.device),
            spatial_shapes=torch.tensor([[h, w]] * b, device=x.device))

    # ----------------------------------------------------------------------------------------- reshape
    def reshape_transform(self, output) -> torch.Tensor:
        """A vision layer's ``(B, prefix + h*w, C)`` output (or a tuple whose first item is that) to
        ``(B, C, h, w)`` float32 on the patch grid of the latest forward pass: patch ``k`` lands at row ``k // w``
        and column ``k % w``; CLIP's class token is dropped."""
        hidden = output[0] if isinstance(output, tuple) else output
        if self.grid is None:
            raise RuntimeError("reshape_transform needs a forward pass of the wrapper first.")
        (h, w), n = self.grid, self.prefix_tokens + self.grid[0] * self.grid[1]
        if hidden.dim() != 3 or hidden.shape[1] != n:
            raise ValueError(f"Cannot map a hidden state of shape {tuple(hidden.shape)} to the {h}x{w} patch grid: "
                             f"expected (B, {n}, C) from a vision layer.")
        tokens = hidden[:, self.prefix_tokens:]
        return tokens.reshape(hidden.shape[0], h, w, -1).permute(0, 3, 1, 2).float()

    def ablation_layer(self) -> "VitTokenAblationLayer":
        """The ablation layer for grad-cam's AblationCAM on :attr:`vision_layers`:
        ``AblationCAM(model=wrapper, ..., reshape_transform=wrapper.reshape_transform,
        ablation_layer=wrapper.ablation_layer())``."""
        return VitTokenAblationLayer()


def _pooled(features) -> torch.Tensor:
    """``get_image_features`` / ``get_text_features`` return the projected embeddings as a tensor in transformers
    4.x and as ``pooler_output`` of a model output in 5.x."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output
