"""Gemma 4 adapter: :class:`QwenVLWrapper`'s contract on Gemma 4's aspect-preserving vision tower and 3x3 pooler.

What the family changes (read in transformers 5.25's ``models/gemma4``), and where it is handled:

- **Resize.** The image processor keeps the aspect ratio: the largest sides that are multiples of 3 x 16 = 48 px
  (:attr:`Gemma4Wrapper.token_cell`) within ``max_soft_tokens x 9`` patches (280 tokens by default), bicubic, then
  0..1 without normalisation. :meth:`preprocess` returns its pixels, resized once from the picture.
- **Patches.** ``pixel_values`` are the patches in raster order, each flattened as (row, column, channel), zero-padded
  to ``max_soft_tokens x 9`` rows, with (x, y) ``image_position_ids`` and (-1, -1) for padding:
  :func:`patchify_padded` builds both in torch (differentiable) as the processor does.
- **Pooling.** The pooler averages 3x3 patches into one soft token (raster order of the ``(H/48, W/48)`` grid) and
  drops the padding; the projector (``embed_vision``) maps each to the decoder. Vision blocks give ``(B, padded
  patches, C)``, the projector ``(B x tokens, C)``: :meth:`~Gemma4Wrapper.reshape_transform` maps both.
- **Text side.** The processor expands the template's ``<|image|>`` to ``<|image>``, one ``<|image|>`` per soft
  token and ``<image|>``, and returns ``mm_token_type_ids`` (image tokens attend both ways in sliding layers): passed
  whole. As for Gemma 3, :meth:`chat_text` leaves out the template's ``<bos>`` when the tokenizer adds one.
- **Decoder.** Dense, mixture of experts (26B-A4B) and per-layer inputs (E2B, E4B) need nothing. Layers that reuse
  earlier keys and values (``num_kv_shared_layers``) are computed at the last positions only and their image
  positions reach nothing: :attr:`~Gemma4Wrapper.layers` ends before them, its last layer blank as usual.

Video and audio go through other inputs and are not explained here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.models.ablation import ViewAblationLayer
from pytorch_grad_cam_vlm.models.answer_text import prompt_inputs
from pytorch_grad_cam_vlm.models.base import DecoderLayers, ModelWrapper, find_module_list
from pytorch_grad_cam_vlm.models.gemma3 import Gemma3Wrapper
from pytorch_grad_cam_vlm.models.qwen_vl import AnswerInput, QwenPromptSide, check_prompt


@dataclass
class Gemma4Layout:
    """Where the image sits in one prompt, for inputs of one size."""

    text_inputs: Dict[str, torch.Tensor]  # input_ids, attention_mask, mm_token_type_ids for batch 1
    grid: Tuple[int, int]  # soft tokens per column and per row: (H/48, W/48)
    vision_positions: torch.Tensor  # sequence positions of the soft tokens, in raster order of the grid
    answer_ids: Optional[torch.Tensor] = None  # the teacher-forced answer's token ids, the last tokens of input_ids

    @property
    def sequence_length(self) -> int:
        return self.text_inputs["input_ids"].shape[1]


def patchify_padded(images: torch.Tensor, patch_size: int, max_patches: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, H, W)`` images to Gemma 4's ``pixel_values`` ``(B, max_patches, p*p*C)`` (patches in raster order,
    each flattened as row, column, channel, then zero rows) and ``image_position_ids`` ``(B, max_patches, 2)`` ((x,
    y) per patch, (-1, -1) for the padding), exactly as ``Gemma4ImageProcessor`` lays them out; differentiable."""
    b, c, height, width = images.shape
    gh, gw = height // patch_size, width // patch_size
    patches = images.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    patches = F.pad(patches.reshape(b, gh * gw, -1), (0, 0, 0, max_patches - gh * gw))
    y, x = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    positions = torch.stack([x, y], dim=-1).reshape(gh * gw, 2)
    positions = F.pad(positions, (0, 0, 0, max_patches - gh * gw), value=-1)
    return patches, positions.to(images.device).expand(b, -1, -1)


def unpatchify(pixel_values: torch.Tensor, positions: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify_padded` for one image: ``(max_patches, p*p*C)`` and its positions to ``(1, C, H,
    W)``."""
    real = positions[:, 0] >= 0
    gh, gw = int(positions[real, 1].max()) + 1, int(positions[real, 0].max()) + 1
    patches = pixel_values[real].reshape(gh, gw, patch_size, patch_size, -1)
    return patches.permute(4, 0, 2, 1, 3).reshape(1, -1, gh * patch_size, gw * patch_size)


class Gemma4Wrapper(QwenPromptSide, DecoderLayers, ModelWrapper):
    """Gemma 4 (dense or mixture of experts) as an image classifier over the vocabulary, for grad-cam.

    ``forward(x)`` takes images ``(B, 3, H, W)`` as :meth:`preprocess` makes them (pixels 0..1, sides multiples of
    :attr:`token_cell`, within the budget of ``max_soft_tokens``) and returns the logits of the next token after the
    chat-formatted ``prompt``, ``(B, vocab)`` float32, or with an ``answer`` its score ``(B, 1)`` (as
    :class:`QwenVLWrapper`). ``max_soft_tokens`` (70, 140, 280, 560 or 1120; default: the image processor's) is the
    processor's budget per image, passed to every processor call.

    :meth:`reshape_transform` maps decoder layers and the :attr:`projector` onto the ``(H/48, W/48)`` grid of soft
    tokens and :attr:`vision_blocks` onto the ``(H/16, W/16)`` grid of patches;
    :class:`~pytorch_grad_cam_vlm.AttentionMap` reads the last position's attention to the soft tokens.

    While a forward pass runs, the model is in eval mode with frozen parameters, and no autograd graph is built
    before the shallowest hooked layer (``efficient_gradients=False`` turns both off); afterwards its modes,
    ``requires_grad`` flags and hooks are as they were.
    """

    ablation_layer_type = ViewAblationLayer  # tells decoder layers from vision blocks, which are 3-D here too
    chat_text = Gemma3Wrapper.chat_text  # the chat template without its <bos> when the tokenizer adds one

    def __init__(self, model: torch.nn.Module, processor, prompt: str, efficient_gradients: bool = True,
                 answer: Optional[AnswerInput] = None, answer_reduction: str = "sum",
                 max_soft_tokens: Optional[int] = None,
                 chat_template_kwargs: Optional[Dict[str, object]] = None) -> None:
        config = model.config
        if getattr(config, "model_type", None) != "gemma4":
            raise ValueError(f"Gemma4Wrapper supports model type 'gemma4', got {config.model_type!r}.")
        check_prompt(prompt, (processor.image_token, processor.boi_token))
        super().__init__(model, processor, efficient_gradients)
        image_processor = processor.image_processor
        if not image_processor.do_normalize:  # the processor's pixels are 0..1 whatever mean and std it stores
            self.image_mean.zero_()
            self.image_std.fill_(1.0)
        self.patch_size = int(image_processor.patch_size)
        self.pooling = int(image_processor.pooling_kernel_size)
        vision_config = config.vision_config
        if (self.patch_size, self.pooling) != (vision_config.patch_size, vision_config.pooling_kernel_size):
            raise ValueError(f"The image processor's patches ({self.patch_size} px, pooled {self.pooling}x"
                             f"{self.pooling}) differ from the vision tower's ({vision_config.patch_size} px, pooled "
                             f"{vision_config.pooling_kernel_size}x{vision_config.pooling_kernel_size}).")
        self.max_soft_tokens = int(max_soft_tokens or image_processor.max_soft_tokens)
        self.processor_kwargs = {"max_soft_tokens": self.max_soft_tokens}  # for every processor call
        self.image_token_id = int(config.image_token_id)
        self._text_model, self._decoder_layers = find_module_list(model, "embed_tokens")
        self._gemma = next(m for m in model.modules() if hasattr(m, "embed_vision"))
        self.vision_tower = self._gemma.vision_tower
        self._vision_blocks = self.vision_tower.encoder.layers
        text_config = config.get_text_config()
        self._usable = text_config.num_hidden_layers - int(getattr(text_config, "num_kv_shared_layers", 0) or 0)
        self._watch_layers(self._decoder_layers, self._vision_blocks, self._gemma)
        self._init_prompt_side(prompt, chat_template_kwargs, answer, answer_reduction)

    # ----------------------------------------------------------------------------------------- layers
    @property
    def layers(self) -> List[torch.nn.Module]:
        """The decoder layers that layer choices index: all of them, or with keys and values shared between layers
        (E2B, E4B) those before the first layer that reuses them (the later ones compute the image positions for
        nothing the next token reads). The last of them gets no gradient at the image positions."""
        return self.decoder_layers[:self._usable]

    def _warn_if_last_layer_hooked(self) -> None:
        """Warn when a gradient method targets :attr:`layers`' last layer or a later one."""
        for layer in self.decoder_layers[self._usable - 1:]:
            self._warn_if_hooked(layer, (
                "Decoder layers from the last of wrapper.layers on give the image positions nothing that reaches "
                "the next-token logits (the last layer, or layers that reuse earlier keys and values), so gradient "
                f"maps there are blank. Use wrapper.decoder_layers[{self._usable - 2}] or an earlier layer, or "
                "explain(wrapper, x) to choose one by the deletion check."))

    @property
    def vision_blocks(self) -> List[torch.nn.Module]:
        """The vision encoder's layers, outputs ``(B, max_soft_tokens x 9, C)``: one row per 16-pixel patch in raster
        order, then padding."""
        return list(self._vision_blocks)

    @property
    def projector(self) -> torch.nn.Module:
        """The multimodal embedder: the pooled soft tokens (3x3 patches each) normalised and projected, one row per
        soft token of the batch."""
        return self._gemma.embed_vision

    @property
    def token_cell(self) -> int:
        """The pixels one soft token covers: ``pooling_kernel_size x patch_size``, 48 for the released models."""
        return self.patch_size * self.pooling

    @property
    def max_patches(self) -> int:
        """The padded length of ``pixel_values``: ``max_soft_tokens`` times the pooled patches per token."""
        return self.max_soft_tokens * self.pooling ** 2

    # ----------------------------------------------------------------------------------------- images and layout
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """The processor's own aspect-preserving resize and rescale, as ``(1, 3, H, W)`` float32 on the CPU (pixels
        0..1 for the released processors). Accepts a path, a PIL image or a uint8 array; any mode is made RGB."""
        encoded = self.processor.image_processor(images=[load_rgb(image)], return_tensors="pt",
                                                 **self.processor_kwargs)
        return unpatchify(encoded["pixel_values"][0].float(), encoded["image_position_ids"][0], self.patch_size)

    def layout_for(self, height: int, width: int) -> Gemma4Layout:
        """Text inputs and soft-token positions for inputs of ``height x width`` pixels, built once per size by the
        processor itself with a placeholder image kept at that size (``do_resize=False``: the processor's resize is
        not idempotent, and any size of whole token cells within the budget is an input the model takes)."""
        key = (height, width)
        if key not in self._layouts:
            patches = (height // self.patch_size) * (width // self.patch_size)
            if patches > self.max_patches:
                raise ValueError(f"A {height}x{width} input has {patches} patches, above the budget of "
                                 f"{self.max_patches} ({self.max_soft_tokens} soft tokens): prepare images with "
                                 "wrapper.preprocess(image).")
            placeholder = np.zeros((height, width, 3), dtype=np.uint8)
            options = {"do_resize": False}
            encoded = self.processor(text=[self.chat_text()], images=[placeholder], return_tensors="pt",
                                     **self.processor_kwargs, **options)
            text_inputs, positions, answer_ids = prompt_inputs(
                self, encoded, placeholder, ("pixel_values", "image_position_ids", "num_soft_tokens_per_image"),
                **options)
            grid = (height // self.token_cell, width // self.token_cell)
            if len(positions) != grid[0] * grid[1]:
                raise ValueError(f"The processor made {len(positions)} image tokens of a {height}x{width} input, "
                                 f"where the model makes {grid[0] * grid[1]}: is this a Gemma 4 processor?")
            layout = Gemma4Layout(text_inputs, grid, positions, answer_ids)
            if layout.sequence_length == self.max_patches:  # reshape_transform tells decoder and vision by length
                raise ValueError(f"The prompt makes {self.max_patches} tokens, as many as the padded patches, so "
                                 "decoder and vision hidden states cannot be told apart: add or remove a word.")
            self._layouts[key] = layout
        return self._layouts[key]

    # ----------------------------------------------------------------------------------------- forward
    def model_inputs(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The model's keyword inputs for images ``x`` ``(B, 3, H, W)`` on the input device: the processor's text
        inputs of this size (``mm_token_type_ids`` included), and ``pixel_values`` and ``image_position_ids`` built
        in torch (differentiable) as the processor lays them out, in the vision tower's dtype."""
        b, _, height, width = x.shape
        layout = self.layout_for(height, width)
        device = self.input_device
        inputs = {k: v.to(device).expand(b, -1) for k, v in layout.text_inputs.items()}
        pixel_values, positions = patchify_padded(x.to(device), self.patch_size, self.max_patches)
        inputs["pixel_values"] = pixel_values.to(next(self.vision_tower.parameters()).dtype)
        inputs["image_position_ids"] = positions
        return inputs

    # ----------------------------------------------------------------------------------------- reshape
    def reshape_transform(self, output) -> torch.Tensor:
        """Hidden states to ``(B, C, h, w)`` float32 on the grid of the latest forward pass.

        Decoder layers ``(B, seq, C)`` (or a tuple whose first item is that) are read at the soft tokens' positions
        and the projector's ``(B x h x w, C)`` by rows, both on the ``(H/48, W/48)`` token grid; vision blocks
        ``(B, max_patches, C)`` give the ``(H/16, W/16)`` patch grid, padding rows dropped.
        """
        hidden = output[0] if isinstance(output, tuple) else output
        layout = self.layout
        if layout is None:
            raise RuntimeError("reshape_transform needs a forward pass of the wrapper first.")
        b, (gh, gw) = self.batch_size, layout.grid
        if hidden.dim() == 3 and hidden.shape[0] == b and hidden.shape[1] == layout.sequence_length:
            grid, rows = (gh, gw), hidden[:, layout.vision_positions.to(hidden.device)]
        elif hidden.dim() == 3 and hidden.shape[0] == b and hidden.shape[1] == self.max_patches:
            grid = (gh * self.pooling, gw * self.pooling)
            rows = hidden[:, :grid[0] * grid[1]]
        elif hidden.dim() == 2 and hidden.shape[0] == b * gh * gw:
            grid, rows = (gh, gw), hidden.reshape(b, gh * gw, -1)
        else:
            raise ValueError(
                f"Cannot map a hidden state of shape {tuple(hidden.shape)} to the image grid: expected ({b}, "
                f"{layout.sequence_length}, C) from a decoder layer before the layers that share keys and values "
                f"(wrapper.layers), ({b}, {self.max_patches}, C) from a vision block or ({b * gh * gw}, C) from the "
                "projector.")
        return rows.reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2).float()

    def token_geometry(self) -> Tuple[int, torch.Tensor, Tuple[int, int]]:
        """For attention maps: the query position (the last), the soft tokens' positions in raster order and their
        grid."""
        if self.layout is None:
            raise RuntimeError("token_geometry needs a forward pass of the wrapper first.")
        return -1, self.layout.vision_positions, self.layout.grid

    def ablation_target(self, index: int) -> Tuple[torch.Tensor, int]:
        """The sequence positions and channel AblationCAM's channel ``index`` stands for: the soft tokens'."""
        return self.layout.vision_positions, index
