"""Gemma 3 adapter: :class:`QwenVLWrapper`'s contract on Gemma 3's SigLIP tower, pooling projector and pan-and-scan.

What the family changes, and where it is handled:

- **Vision tower.** SigLIP on square images of its ``image_size`` (896 px, 14-px patches: 64x64 patches). The
  projector (``Gemma3MultiModalProjector``) average-pools the patch grid to ``mm_tokens_per_image`` tokens (16x16,
  kernel 4: one token per 56-px cell, :attr:`Gemma3Wrapper.token_cell`), then normalises and projects them.
  :meth:`~Gemma3Wrapper.reshape_transform` maps vision blocks on the patch grid, the projector and decoder layers on
  the token grid.
- **Text side.** The processor rewrites the chat template's ``<start_of_image>`` into ``\\n\\n<start_of_image>`` +
  the image tokens + ``<end_of_image>\\n\\n`` and returns ``token_type_ids`` (1 at image tokens), from which the model
  builds a mask where each image's tokens attend to each other both ways: the wrapper passes the processor's text
  inputs whole (left out, the tiny test model's logits move by up to 0.11). The chat template writes ``<bos>``
  itself; the processor's tokenizer adds one too, so :meth:`~Gemma3Wrapper.chat_text` leaves the template's out and
  the tokens equal ``processor.apply_chat_template(..., tokenize=True)``'s.
- **Decoder.** Scaled embeddings, sliding-window and global layers; the last layer's image positions get no gradient
  (:attr:`~Gemma3Wrapper.last_layer_blank`), as for every decoder here.
- **Pan-and-scan** (``pan_and_scan=True``, the processor's ``do_pan_and_scan``): the whole picture and 2-4 crops,
  each another block of image tokens in a rewritten prompt. ``forward`` takes the canvas of the processor's crops
  (:mod:`pytorch_grad_cam_vlm.models.pan_and_scan`), cuts the crops from it and resizes the canvas to the whole
  image in torch (bilinear, antialiased, as the processor's resize; differentiable); ``view`` draws the maps from
  the crops' tokens, the whole image's, or both.
- **Several images in one prompt** (without pan-and-scan): ``preprocess([a, b])`` lays the square images side by
  side on one canvas (:mod:`pytorch_grad_cam_vlm.models.multi_image`); ``forward`` cuts them apart again, the
  processor writes one block of image tokens per image, and each image's grid lands on its square of the canvas.

Measured on the tiny random test models (models/tiny/gemma3.py, seeds 0 and 1; logits of standard deviation ~0.16)
against ``processor.apply_chat_template(..., tokenize=True)``'s inputs, over 21 pictures of discs in 7 sizes:
without crops the wrapper's input is the processor's ``pixel_values`` and the logits agree to 2e-7. With
pan-and-scan the crops, ``input_ids`` and ``token_type_ids`` are the processor's exactly; the processor resizes the
whole image from the picture, the wrapper from the canvas (one resampling more, and unequal crops stretched
unequally), so the logits differ: by at most 4.0e-3 with the processor's default crops (>= 256 px) and 1.4e-2 with
small crops (>= 16 px: a 40x130 photo cut into crops of 44, 44 and 42 px), medians 1.0e-3 and 1.2e-3
(``benchmarks/gemma3_whole_image.py``: seeds 0 and 1, 10 picture sizes of 2 to 4 crops, discs and photo-like
pictures). Rebuilding the picture from the crops before the resize does not tighten it (6.9e-3 both ways). Fed the
processor's own whole image (``model_inputs(x, whole_images=processor_whole_image(image))``) they agree to 2e-7.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.models.answer_text import prompt_inputs
from pytorch_grad_cam_vlm.models.base import DecoderLayers, ModelWrapper, find_module_list
from pytorch_grad_cam_vlm.models.clip import find_vision_tower
from pytorch_grad_cam_vlm.models.frame import ImageFrame
from pytorch_grad_cam_vlm.models.multi_image import (ImageBoxes, check_canvas, crops as box_crops, place,
                                                     preprocess_several)
from pytorch_grad_cam_vlm.models.pan_and_scan import VIEWS, Gemma3Layout, canvas_crops, crops_frame, image_grids
from pytorch_grad_cam_vlm.models.qwen_vl import AnswerInput, QwenPromptSide, QwenVLWrapper, check_prompt
from pytorch_grad_cam_vlm.models.tiles import TileViews, canvas_to_tiles, tiles_to_canvas


class Gemma3Wrapper(QwenPromptSide, TileViews, DecoderLayers, ModelWrapper):
    """Gemma 3 as an image classifier over the vocabulary, for grad-cam.

    ``forward(x)`` takes normalised images ``(B, 3, H, W)`` as :meth:`preprocess` makes them: the square image at the
    encoder's size, or with ``pan_and_scan=True`` the canvas of the processor's crops (the square image when the
    picture is too square for crops), and returns the logits of the next token after the chat-formatted ``prompt``,
    ``(B, vocab)`` float32, or with an ``answer`` its score ``(B, 1)`` (as :class:`QwenVLWrapper`).
    ``pan_and_scan`` is ``processor(..., do_pan_and_scan=True)``: a call option, since ``Gemma3Processor``'s call
    defaults (off; crops of at least 256 px, at most 4) override the image processor's config. The wrapper passes
    it, and ``pan_and_scan_options`` (the processor's ``pan_and_scan_min_crop_size``, ``pan_and_scan_max_num_crops``,
    ``pan_and_scan_min_ratio_to_activate``), to every processor call.

    :meth:`reshape_transform` maps decoder layers, :attr:`vision_blocks` and the :attr:`projector` onto the input's
    token grid; with crops, ``view`` (``"crops"``, ``"whole"`` or ``"combined"``) chooses which tokens draw the map.
    :class:`~pytorch_grad_cam_vlm.AttentionMap` reads the last position's attention to the same tokens.

    While a forward pass runs, the model is in eval mode with frozen parameters, and no autograd graph is built
    before the shallowest hooked layer (``efficient_gradients=False`` turns both off); afterwards its modes,
    ``requires_grad`` flags and hooks are as they were.
    """

    views = VIEWS

    def __init__(self, model: torch.nn.Module, processor, prompt: str, efficient_gradients: bool = True,
                 answer: Optional[AnswerInput] = None, answer_reduction: str = "sum", view: str = "combined",
                 pan_and_scan: bool = False, pan_and_scan_options: Optional[Dict[str, float]] = None,
                 chat_template_kwargs: Optional[Dict[str, object]] = None) -> None:
        config = model.config
        if getattr(config, "model_type", None) != "gemma3":
            raise ValueError(f"Gemma3Wrapper supports model type 'gemma3', got {config.model_type!r}.")
        check_prompt(prompt, ("<start_of_image>", "<image_soft_token>"))
        options = dict(pan_and_scan_options or {})
        unknown = [key for key in options if not key.startswith("pan_and_scan_")]
        if unknown:
            raise ValueError(f"pan_and_scan_options takes the processor's pan_and_scan_* keywords, got {unknown}.")
        super().__init__(model, processor, efficient_gradients)
        self.processor_kwargs = {"do_pan_and_scan": bool(pan_and_scan), **options}  # for every processor call
        self.image_token_id = int(config.image_token_id)
        vision_config = config.vision_config
        self.image_size = int(vision_config.image_size)
        self.patch_size = int(vision_config.patch_size)
        self.grid = int(round(int(config.mm_tokens_per_image) ** 0.5))
        if self.image_size % self.grid:
            raise ValueError(f"{config.mm_tokens_per_image} tokens per image do not tile {self.image_size}-pixel "
                             "images in whole pixels: is this a Gemma 3 checkpoint?")
        self._text_model, self._decoder_layers = find_module_list(model, "embed_tokens")
        self.vision_tower, self._vision_blocks = find_vision_tower(model)
        self._gemma = next(m for m in model.modules() if hasattr(m, "multi_modal_projector"))
        self._watch_layers(self._decoder_layers, self._vision_blocks, self._gemma)
        self.view = view
        self.source_size: Optional[Tuple[int, int]] = None  # (h, w) of the picture; preprocess sets it
        self.image_boxes: Optional[ImageBoxes] = None  # several images on one canvas, set by preprocess
        self._init_prompt_side(prompt, chat_template_kwargs, answer, answer_reduction)

    # ----------------------------------------------------------------------------------------- layers
    @property
    def vision_blocks(self) -> List[torch.nn.Module]:
        """The SigLIP encoder's layers, outputs ``(B x images, patches, C)``: one row per patch (14 px)."""
        return list(self._vision_blocks)

    @property
    def projector(self) -> torch.nn.Module:
        """The multimodal projector: the patch grid average-pooled to one vector per image token."""
        return self._gemma.multi_modal_projector

    @property
    def token_cell(self) -> int:
        """The pixels one image token covers on the input, ``image_size / sqrt(mm_tokens_per_image)``: 56 for the
        released 896-px models (a 4x4 pool of 14-px patches)."""
        return self.image_size // self.grid

    # ----------------------------------------------------------------------------------------- text and images
    def chat_text(self) -> str:
        """The prompt as the processor takes it: the chat template around one image and the question (and the answer
        when one is set as text), without the template's ``<bos>`` when the tokenizer adds one itself."""
        text = QwenVLWrapper.chat_text(self)
        tokenizer = self.processor.tokenizer
        bos = tokenizer.bos_token
        adds_bos = tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
        return text[len(bos):] if bos and adds_bos and text.startswith(bos) else text

    def _encode(self, rgb, text: Optional[str] = None) -> dict:
        """The processor on one picture (or the prompt's pictures, a list) and the chat text, with the wrapper's
        pan-and-scan options."""
        return self.processor(text=[text or self.chat_text()], images=[rgb], return_tensors="pt",
                              **self.processor_kwargs)

    def preprocess(self, image: Union[ImageInput, Sequence[ImageInput]]) -> torch.Tensor:
        """The processor's own resizing and normalisation, as ``(1, 3, H, W)`` float32 on the CPU: the square image,
        or with pan-and-scan crops the canvas of the processor's crops. Sets :attr:`source_size`. A list of images
        asks them all in one prompt (without pan-and-scan): their squares side by side on one canvas, which
        :attr:`image_boxes` remembers until the next call."""
        if isinstance(image, (list, tuple)):
            if self.processor_kwargs["do_pan_and_scan"]:
                raise ValueError("Several images in one prompt take Gemma 3 without pan-and-scan: create the wrapper "
                                 "with pan_and_scan=False, or explain the images one at a time.")
            return preprocess_several(self, image, self.preprocess)
        self.image_boxes = None
        rgb = load_rgb(image)
        pixel_values = self._encode(rgb)["pixel_values"].float()
        self.source_size = (rgb.size[1], rgb.size[0])
        if len(pixel_values) == 1:
            return pixel_values
        s = self.image_size
        rows, cols = canvas_crops(self._canvas(self.source_size, len(pixel_values) - 1), s)
        return tiles_to_canvas(pixel_values[1:], rows, cols)

    def processor_whole_image(self, image: ImageInput) -> torch.Tensor:
        """The processor's own whole image of ``image`` ``(1, 3, S, S)``, resized from the picture, which
        ``model_inputs(x, whole_images=...)`` takes to reproduce the processor path exactly."""
        return self._encode(load_rgb(image))["pixel_values"][:1].float()

    def image_frame(self, image_size: Tuple[int, int], input_size: Tuple[int, int]) -> ImageFrame:
        """Where the input lies on the picture (see :meth:`ModelWrapper.image_frame`): the one square image squashes
        it; a pan-and-scan canvas shows each crop on its square (:func:`~pytorch_grad_cam_vlm.models.pan_and_scan.
        crops_frame`)."""
        return crops_frame(tuple(image_size), tuple(input_size), self.image_size)

    def canvas_size(self, source_size: Tuple[int, int]) -> Tuple[int, int]:
        """The input ``(H, W)`` :meth:`preprocess` makes of a picture of ``source_size`` ``(h, w)``: the square image,
        or the canvas of as many crops as the processor cuts from it."""
        count = len(self._encode(np.zeros(tuple(source_size) + (3,), np.uint8))["pixel_values"]) - 1
        return self._canvas(source_size, count)

    def _canvas(self, source_size: Tuple[int, int], count: int) -> Tuple[int, int]:
        """The canvas of ``count`` crops (0: none), along the picture's long side as the processor cuts them."""
        s = self.image_size
        if count == 0:
            return s, s
        return (s, count * s) if source_size[1] >= source_size[0] else (count * s, s)

    # ----------------------------------------------------------------------------------------- layout

    def layout_for(self, height: int, width: int) -> Gemma3Layout:
        """Text inputs and token geometry for inputs of ``height x width`` pixels, built once per size by the
        processor itself with a placeholder picture (of :attr:`source_size` for a canvas of crops; one per image for
        several images in one prompt)."""
        if self.image_boxes is not None:
            check_canvas(self.image_boxes, height, width)
            return self._layout((height, width), (height, width), self.image_boxes)
        rows, cols = canvas_crops((height, width), self.image_size)
        source = (height, width)
        if rows * cols > 1:
            if self.source_size is None or self.canvas_size(self.source_size) != (height, width):
                raise ValueError(
                    f"A {height}x{width} input is a pan-and-scan canvas of {rows * cols} crops, but "
                    f"wrapper.source_size {self.source_size} is not a picture the processor cuts so: prepare images "
                    "with wrapper.preprocess(image), which sets wrapper.source_size.")
            source = self.source_size
        return self._layout((height, width), source)

    def _layout(self, canvas: Tuple[int, int], source: Tuple[int, int],
                boxes: Optional[ImageBoxes] = None) -> Gemma3Layout:
        key = canvas + tuple(source) + (boxes,)
        if key not in self._layouts:
            placeholder = np.zeros(tuple(source) + (3,), dtype=np.uint8) if boxes is None else \
                [np.zeros((h, w, 3), dtype=np.uint8) for _, _, h, w in boxes.boxes]
            encoded = self._encode(placeholder)
            text_inputs, positions, answer_ids = prompt_inputs(self, encoded, placeholder,
                                                               ("pixel_values", "num_crops"))
            crops = (1, 1) if boxes is not None else canvas_crops(canvas, self.image_size)
            layout = Gemma3Layout(text_inputs, positions, self.grid, crops, canvas, answer_ids, boxes)
            if len(positions) != layout.image_count * self.grid ** 2 \
                    or len(encoded["pixel_values"]) != layout.image_count:
                raise ValueError(f"The processor made {len(encoded['pixel_values'])} images and {len(positions)} "
                                 f"image tokens of a {source[0]}x{source[1]} picture, where a {canvas[0]}x"
                                 f"{canvas[1]} input holds {layout.image_count} images of {self.grid ** 2} tokens: "
                                 "prepare images with wrapper.preprocess(image).")
            self._layouts[key] = layout
        return self._layouts[key]

    # ----------------------------------------------------------------------------------------- forward
    def model_inputs(self, x: torch.Tensor, whole_images: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The model's keyword inputs for images ``x`` ``(B, 3, H, W)`` on the input device: the processor's text
        inputs of this size (``token_type_ids`` included) and ``pixel_values`` in the vision tower's dtype; with
        crops, the whole image (the canvas resized in torch, differentiable; or ``whole_images`` ``(B or 1, 3, S,
        S)``, e.g. :meth:`processor_whole_image`) followed by the crops cut from the canvas."""
        b, _, height, width = x.shape
        layout = self.layout_for(height, width)
        device = self.input_device
        inputs = {k: v.to(device).expand(b, -1) for k, v in layout.text_inputs.items()}
        x = x.to(device)
        if layout.boxes is not None:
            x = torch.stack(box_crops(x, layout.boxes), dim=1).flatten(0, 1)  # sample by sample, image by image
        elif layout.has_crops:
            s, (rows, cols) = self.image_size, layout.crops
            if whole_images is None:  # bilinear with antialiasing, as the processor's resize
                whole_images = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            crops = canvas_to_tiles(x, rows, cols)
            x = torch.cat([whole_images.to(x).expand(b, -1, -1, -1)[:, None], crops], dim=1).flatten(0, 1)
        inputs["pixel_values"] = x.to(next(self.vision_tower.parameters()).dtype)
        return inputs

    # ----------------------------------------------------------------------------------------- reshape
    def reshape_transform(self, output) -> torch.Tensor:
        """Hidden states to ``(B, C, h, w)`` float32 on the token grid of the latest forward pass (``(B, 2C, h, w)``
        for the ``"combined"`` view of crops; vision blocks on the finer patch grid).

        Decoder layers ``(B, seq, C)`` (or a tuple whose first item is that) are read at the image positions, vision
        blocks ``(B x images, patches, C)`` and the projector ``(B x images, tokens, C)`` by rows; each image's grid
        is placed as :mod:`pytorch_grad_cam_vlm.models.pan_and_scan` says.
        """
        hidden = output[0] if isinstance(output, tuple) else output
        layout = self.layout
        if layout is None:
            raise RuntimeError("reshape_transform needs a forward pass of the wrapper first.")
        b, images, patches = self.batch_size, layout.image_count, (self.image_size // self.patch_size) ** 2
        if hidden.dim() == 3 and hidden.shape[0] == b and hidden.shape[1] == layout.sequence_length:
            tokens = hidden[:, layout.image_positions.to(hidden.device)].reshape(b, images, self.grid ** 2, -1)
        elif hidden.dim() == 3 and hidden.shape[0] == b * images and hidden.shape[1] in (patches, self.grid ** 2):
            tokens = hidden.reshape(b, images, hidden.shape[1], -1)
        else:
            raise ValueError(f"Cannot map a hidden state of shape {tuple(hidden.shape)} to the image grid: expected "
                             f"({b}, {layout.sequence_length}, C) from a decoder layer, ({b * images}, {patches}, C) "
                             f"from a vision block or ({b * images}, {self.grid ** 2}, C) from the projector.")
        if layout.boxes is not None:  # each image's grid on its square of the canvas
            side = int(round(tokens.shape[2] ** 0.5))
            grids = tokens.float().reshape(b, images, side, side, -1).permute(1, 0, 4, 2, 3)
            return place(list(grids), layout.boxes, self.image_size // side)
        whole, crops = image_grids(tokens.float(), layout)
        return self.place_views(crops, whole)

    # ----------------------------------------------------------------------------------------- attention
    def token_geometry(self) -> Tuple[int, torch.Tensor, Tuple[int, int]]:
        """For attention maps: the query position (the last), the whole image's token positions in raster order
        (without crops: the one image's) and their grid; :meth:`image_row_to_grid` places the crops' too."""
        if self.layout is None:
            raise RuntimeError("token_geometry needs a forward pass of the wrapper first.")
        return -1, self.layout.whole_positions, (self.grid, self.grid)

    # ----------------------------------------------------------------------------------------- ablation
    @property
    def view_positions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The crops' token positions and the whole image's (without crops: the whole image's for both)."""
        return self.layout.crop_positions, self.layout.whole_positions
