"""Mistral 3 adapter (Mistral Small 3.1/3.2, Magistral Small, Ministral 3): :class:`QwenVLWrapper`'s contract on
Pixtral's vision encoder.

What the family does, read from transformers' ``models/mistral3`` and ``models/pixtral``, and where it is handled:

- **Image processor** (``PixtralImageProcessor``, called by ``PixtralProcessor`` with ``patch_size = patch x
  spatial_merge_size``): keeps the aspect ratio, shrinks an image whose longer side exceeds ``longest_edge`` (1540
  px released) and rounds each side *up* to a multiple of ``patch x merge`` (28 px released), then pads a batch to
  its largest image. ``pixel_values`` is the image itself ``(B, 3, H, W)`` and ``image_sizes`` its size, so the
  wrapper's input is the processor's exactly; :meth:`~Mistral3Wrapper.preprocess` resizes once, from the picture.
- **Text side.** ``[IMG]`` per merged cell in raster order, an ``[IMG_BREAK]`` after each row but the last and
  ``[IMG_END]`` after it: only the ``[IMG]`` positions carry image features (the break tokens are text embeddings),
  so :meth:`~Mistral3Wrapper.reshape_transform` reads decoder layers at those positions and drops the breaks.
- **Vision tower** (``PixtralVisionModel``): every image's patches of every batch row go into one sequence
  ``(1, sum of h*w, C)`` in raster order, with a block-diagonal mask (each image attends to itself) and 2-D rotary
  positions. The decoder sees the hidden state ``vision_feature_layer`` selects (the last block's by default); the
  blocks after it reach nothing, and :attr:`~Mistral3Wrapper.vision_blocks` leaves them out.
- **Projector** (``Mistral3MultiModalProjector``): RMSNorm, then the patch merger (2x2 patches by ``unfold``, in
  raster order of the merged grid), then two linear layers: rows ``(sum of h*w/4, C_text)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.models.ablation import ViewAblationLayer
from pytorch_grad_cam_vlm.models.answer_text import prompt_inputs
from pytorch_grad_cam_vlm.models.base import DecoderLayers, ModelWrapper, find_module_list
from pytorch_grad_cam_vlm.models.gemma3 import Gemma3Wrapper
from pytorch_grad_cam_vlm.models.qwen_vl import AnswerInput, Layout, QwenPromptSide, check_prompt

IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


@dataclass
class Mistral3Layout(Layout):
    """:class:`Layout` of one Mistral 3 prompt; ``grid_thw`` is ``(1, h, w)`` in patches of the vision tower."""

    @property
    def sequence_length(self) -> int:
        return int(self.text_inputs["input_ids"].shape[1])


class Mistral3Wrapper(QwenPromptSide, DecoderLayers, ModelWrapper):
    """Mistral 3 as an image classifier over the vocabulary, for grad-cam.

    ``forward(x)`` takes normalised images ``(B, 3, H, W)`` (all of one size, multiples of :attr:`token_cell`, as
    :meth:`preprocess` makes them) and returns the logits of the next token after the chat-formatted ``prompt``,
    ``(B, vocab)`` float32, or with an ``answer`` its score ``(B, 1)`` (as :class:`QwenVLWrapper`).
    :meth:`reshape_transform` maps decoder layers (at the ``[IMG]`` positions), :attr:`vision_blocks` (on the patch
    grid) and the :attr:`projector` (on the token grid) onto the input. :class:`~pytorch_grad_cam_vlm.AttentionMap`
    reads the last position's attention to the ``[IMG]`` tokens.

    While a forward pass runs, the model is in eval mode with frozen parameters, and no autograd graph is built
    before the shallowest hooked layer (``efficient_gradients=False`` turns both off); afterwards its modes,
    ``requires_grad`` flags and hooks are as they were.
    """

    ablation_layer_type = ViewAblationLayer
    chat_text = Gemma3Wrapper.chat_text  # the template writes <s>, and so may the tokenizer: keep one

    def __init__(self, model: torch.nn.Module, processor, prompt: str, efficient_gradients: bool = True,
                 answer: Optional[AnswerInput] = None, answer_reduction: str = "sum",
                 chat_template_kwargs: Optional[Dict[str, object]] = None) -> None:
        config = model.config
        if getattr(config, "model_type", None) != "mistral3":
            raise ValueError(f"Mistral3Wrapper supports model type 'mistral3', got {config.model_type!r}.")
        check_prompt(prompt, IMAGE_TOKENS)
        super().__init__(model, processor, efficient_gradients)
        self.patch_size = int(config.vision_config.patch_size)
        self.merge_size = int(config.spatial_merge_size)
        if (int(processor.patch_size), int(processor.spatial_merge_size)) != (self.patch_size, self.merge_size):
            raise ValueError(f"The processor's patch {processor.patch_size} and merge {processor.spatial_merge_size} "
                             f"differ from the model's {self.patch_size} and {self.merge_size}: load the processor "
                             "saved with the model.")
        self.image_token_id = int(config.image_token_id)
        self._text_model, self._decoder_layers = find_module_list(model, "embed_tokens")
        self._mistral = next(m for m in model.modules() if hasattr(m, "multi_modal_projector"))
        self.vision_tower = self._mistral.vision_tower
        blocks = self.vision_tower.transformer.layers
        self._vision_blocks = blocks
        self._used_blocks = _blocks_reaching_projector(config.vision_feature_layer, len(blocks))
        self._watch_layers(self._decoder_layers, blocks, self._mistral)
        self._init_prompt_side(prompt, chat_template_kwargs, answer, answer_reduction)

    # ----------------------------------------------------------------------------------------- layers
    @property
    def vision_blocks(self) -> List[torch.nn.Module]:
        """Pixtral's layers up to the one ``vision_feature_layer`` selects (all of them by default): outputs
        ``(1, patches of the batch, C)``, one row per patch in raster order, image after image."""
        return list(self._vision_blocks)[:self._used_blocks]

    @property
    def projector(self) -> torch.nn.Module:
        """The multimodal projector: RMSNorm, 2x2 patch merger, two linear layers; one row per image token."""
        return self._mistral.multi_modal_projector

    @property
    def token_cell(self) -> int:
        """The pixels one image token covers: ``patch x spatial_merge_size`` (28 released: 2x2 patches of 14)."""
        return self.patch_size * self.merge_size

    # ----------------------------------------------------------------------------------------- images
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """The processor's own resize (aspect kept, within ``longest_edge``, sides rounded up to multiples of
        :attr:`token_cell`) and normalisation, once from the picture, as ``(1, 3, H, W)`` float32 on the CPU."""
        encoded = self.processor.image_processor(images=[load_rgb(image)], patch_size=self.token_cell,
                                                 return_tensors="pt")
        return encoded["pixel_values"].float()

    def layout_for(self, height: int, width: int) -> Mistral3Layout:
        """Text inputs and token grid for images of ``height x width`` pixels, built once per size by the processor
        itself with a placeholder image (which it keeps as it is when the size is one :meth:`preprocess` makes)."""
        key = (height, width)
        if key not in self._layouts:
            placeholder = np.zeros((height, width, 3), dtype=np.uint8)
            encoded = self.processor(text=[self.chat_text()], images=[placeholder], return_tensors="pt")
            size = tuple(int(v) for v in encoded["image_sizes"][0])
            if size != key:
                raise ValueError(f"The processor resizes {height}x{width} images to {size[0]}x{size[1]} (its "
                                 f"longest_edge is {self.processor.image_processor.size['longest_edge']} px): "
                                 "prepare images with wrapper.preprocess(image).")
            text_inputs, positions, answer_ids = prompt_inputs(self, encoded, placeholder,
                                                               ("pixel_values", "image_sizes"))
            grid = torch.tensor([[1, height // self.patch_size, width // self.patch_size]])
            self._layouts[key] = Mistral3Layout(text_inputs, grid, positions, answer_ids)
        return self._layouts[key]

    # ----------------------------------------------------------------------------------------- forward
    def model_inputs(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The model's keyword inputs for images ``x`` ``(B, 3, H, W)`` on the input device: the processor's text
        inputs of this size, ``pixel_values`` (the images themselves, in the vision tower's dtype) and
        ``image_sizes``."""
        b, _, height, width = x.shape
        layout = self.layout_for(height, width)
        device = self.input_device
        inputs = {k: v.to(device).expand(b, -1) for k, v in layout.text_inputs.items()}
        inputs["pixel_values"] = x.to(device, next(self.vision_tower.parameters()).dtype)
        inputs["image_sizes"] = torch.tensor([[height, width]] * b, device=device)
        return inputs

    # ----------------------------------------------------------------------------------------- reshape
    def reshape_transform(self, output) -> torch.Tensor:
        """Hidden states to ``(B, C, h, w)`` float32 on the true grid of the latest forward pass.

        Decoder layers ``(B, seq, C)`` (or a tuple whose first item is that) give the grid of image tokens from the
        ``[IMG]`` positions (row breaks dropped); vision blocks ``(1, B*h*w, C)`` the ``h x w`` grid of patches; the
        projector ``(B*h*w/4, C)`` the grid of image tokens.
        """
        hidden = output[0] if isinstance(output, tuple) else output
        layout = self.layout
        if layout is None:
            raise RuntimeError("reshape_transform needs a forward pass of the wrapper first.")
        b, (gh, gw), m = self.batch_size, layout.patch_grid, self.merge_size
        decoder = (b, layout.sequence_length, self.model.config.text_config.hidden_size)
        if tuple(hidden.shape) == decoder:
            tokens = hidden[:, layout.vision_positions.to(hidden.device)]
            return tokens.reshape(b, gh // m, gw // m, -1).permute(0, 3, 1, 2).float()
        rows = hidden[0] if hidden.dim() == 3 and hidden.shape[0] == 1 else hidden
        if rows.dim() == 2 and rows.shape[0] in (b * gh * gw, b * gh * gw // m ** 2):
            h, w = (gh, gw) if rows.shape[0] == b * gh * gw else (gh // m, gw // m)
            return rows.reshape(b, h, w, -1).permute(0, 3, 1, 2).float()
        raise ValueError(f"Cannot map a hidden state of shape {tuple(hidden.shape)} to the image grid: expected "
                         f"{decoder} from a decoder layer, (1, {b * gh * gw}, C) from a vision block or "
                         f"({b * gh * gw // m ** 2}, C) from the projector.")

    # ----------------------------------------------------------------------------------------- attention, ablation
    def token_geometry(self) -> Tuple[int, torch.Tensor, Tuple[int, int]]:
        """For attention maps: the query position (the last), the ``[IMG]`` positions in raster order and their
        grid."""
        if self.layout is None:
            raise RuntimeError("token_geometry needs a forward pass of the wrapper first.")
        (gh, gw), m = self.layout.patch_grid, self.merge_size
        return -1, self.layout.vision_positions, (gh // m, gw // m)

    def ablation_target(self, index: int) -> Tuple[torch.Tensor, int]:
        """The sequence positions and channel AblationCAM's channel ``index`` stands for: the ``[IMG]`` tokens."""
        return self.layout.vision_positions, index


def _blocks_reaching_projector(feature_layer, count: int) -> int:
    """How many of the ``count`` vision blocks feed the projector: ``vision_feature_layer`` indexes the tower's
    hidden states (the embeddings, then each block's output), one index or a list of them."""
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    return max(int(i) % (count + 1) for i in layers)
