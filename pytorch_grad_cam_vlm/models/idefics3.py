"""Idefics3 and SmolVLM adapter: :class:`QwenVLWrapper`'s contract on the tiled Idefics3 family: model type
``"idefics3"`` (Idefics3, SmolVLM) and ``"smolvlm"`` (SmolVLM2).

What the family changes, and where it is handled:

- **Tiles plus a global image.** The image processor resizes the picture's longest edge to ``size["longest_edge"]``,
  then each side up to a multiple of the tile size ``max_image_size["longest_edge"]`` (512 px in SmolVLM, 364 in
  Idefics3-8B): that image, the *canvas*, is cut into ``rows x cols`` square tiles in raster order, and the canvas
  resized to one tile (LANCZOS) is appended as the *global image*. A canvas of one tile is not split: the model then
  sees that one image alone (as with ``do_image_splitting=False``). :meth:`Idefics3Wrapper.preprocess` returns the
  canvas; ``forward`` cuts the tiles from it (exactly the processor's) and builds the global image in torch
  (:meth:`Idefics3Wrapper.global_image`).
- **Pixel shuffle.** The vision encoder (SigLIP-like, patch 16 in SmolVLM) gives ``(tile / patch)^2`` patches per
  image; the connector folds each ``scale_factor x scale_factor`` block of patches into one token (``scale_factor``
  4 in SmolVLM-256M: 8x8 tokens per 512 px tile) and projects it. Its tokens come in raster order of the block grid,
  so one token covers ``patch x scale_factor`` pixels of its tile (:attr:`Idefics3Wrapper.token_cell`).
- **Row and column markers.** The prompt holds ``<fake_token_around_image><row_i_col_j>`` and the tile's image tokens
  for each tile, a newline after each row of tiles, then ``<fake_token_around_image><global-img>``, the global
  image's tokens and ``<fake_token_around_image>``. The processor builds it, on a placeholder picture of the
  canvas's size, once per size; :meth:`Idefics3Wrapper.layout_for` checks that each tile's run of image tokens
  follows its own marker and the last run follows ``<global-img>``.
- **Padding images.** The model drops every image whose values are all exactly 0 (how the processor pads batches of
  pictures with different tile counts). The wrapper's batch is one canvas size, so nothing is padded, but a
  perturbed input can hold a tile of zeros (a normalised grey 127.5, a ScoreCAM mask): such an image gets the
  smallest normal number of its dtype at one pixel, so that the model keeps it and the token count holds.

The global image: the processor resizes the canvas's uint8 pixels in two passes (the width, then the height), each
result uint8; the wrapper resizes the normalised canvas with the same filter in the same two passes (torchvision's,
antialiased, differentiable), each clipped to the pixel range. The two differ only by the processor's rounding to
uint8 (about one level at most, 1/255 before normalisation; tested). Measured on the
tiny test models (next-token logits of standard deviation ~0.16) over 40 pictures of filled discs and 40 of random
noise, 4 of each in 10 sizes (1x3 to 3x3 tiles), against the model called on the processor's inputs: at most 1.8e-4
(SmolVLM) and 2.0e-4 (Idefics3) on discs, 1.2e-3 on noise, whose energy lies at the highest frequencies, where the
rounding of the processor's intermediate pass matters most. Fed the processor's own global image
(``model_inputs(x, global_images=processor_global_image(image))``), the input equals the processor's exactly and so
do the logits (difference 0 measured; tested to 1e-5). The processor resizes with LANCZOS on the CPU only (with
torchvision < 0.27 it falls back to BICUBIC, and so does the wrapper): on an accelerator the canvas goes to the CPU
for that resize and back, inside the graph.

The maps lie on the canvas's grid of tile tokens (``rows * g x cols * g``, ``g`` tokens per tile side), drawn by the
tokens ``view`` names: ``"tiles"`` (each tile's tokens on its own square of the canvas), ``"global"`` (the global
image's ``g x g`` tokens resized bilinearly over the whole canvas, which it squashes into one tile) or
``"combined"`` (default: both, stacked as channels ``(B, 2C, h, w)``, so that grad-cam sums them before its ReLU, as
:mod:`pytorch_grad_cam_vlm.models.anyres` explains for LLaVA's ``"combined"``). A canvas of one tile has one image,
drawn under every view. Vision blocks map the same way on the finer patch grid, the connector on the token grid.

Several pictures in one prompt: ``preprocess([a, b])`` lays their canvases side by side
(:mod:`pytorch_grad_cam_vlm.models.multi_image`); ``forward`` gives the encoder each picture's tiles and global image
in turn, the processor writes each picture's markers and tokens, and each picture's view lands on its box.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.models.answer_text import prompt_inputs
from pytorch_grad_cam_vlm.models.base import DecoderLayers, ModelWrapper, find_module_list
from pytorch_grad_cam_vlm.models.multi_image import check_canvas, encode_pictures, place_padded, preprocess_several
from pytorch_grad_cam_vlm.models.qwen_vl import AnswerInput, QwenPromptSide, check_prompt
from pytorch_grad_cam_vlm.models.tiles import TiledLayout, TileViews, canvas_to_tiles, tile_grids, tiles_to_canvas

IDEFICS3_FAMILIES = ("idefics3", "smolvlm")
VIEWS = ("tiles", "global", "combined")


@dataclass
class TileLayout(TiledLayout):
    """Idefics3's layout: ``tiles`` is ``(0, 0)`` when the canvas is one unsplit image, which is then its one image;
    a split picture's global image follows its tiles."""

    @property
    def split(self) -> bool:
        return self.tiles != (0, 0)

    @property
    def tile_positions(self) -> torch.Tensor:
        """Positions of the tiles' tokens, tile by tile in raster order, each tile's in raster order."""
        return self.image_positions[:-self.grid ** 2]

    @property
    def global_positions(self) -> torch.Tensor:
        """Positions of the global image's tokens (of the one image when unsplit) in raster order."""
        return self.image_positions[-self.grid ** 2:]


class Idefics3Wrapper(QwenPromptSide, TileViews, DecoderLayers, ModelWrapper):
    """Idefics3, SmolVLM or SmolVLM2 as an image classifier over the vocabulary, for grad-cam.

    ``forward(x)`` takes normalised canvases ``(B, 3, H, W)`` as :meth:`preprocess` makes them (the processor's tiles
    put back together, ``H = rows * tile``, ``W = cols * tile``; or one tile) and returns the logits of the next token
    after the chat-formatted ``prompt``, ``(B, vocab)`` float32, or with an ``answer`` its score ``(B, 1)`` (as
    :class:`QwenVLWrapper`). The tiles are crops of the canvas and the global image its resize (see the module's
    docstring), so that gradients reach every pixel through both.

    :meth:`reshape_transform` maps decoder layers, :attr:`vision_blocks` and the :attr:`connector` onto the canvas's
    grid; ``view`` (``"tiles"``, ``"global"`` or ``"combined"``) chooses which image's tokens draw the map.
    AblationCAM takes ``ablation_layer=wrapper.ablation_layer()``; :class:`~pytorch_grad_cam_vlm.AttentionMap` reads
    the last position's attention to the view's tokens.

    While a forward pass runs, the model is in eval mode with frozen parameters, and no autograd graph is built
    before the shallowest hooked layer (``efficient_gradients=False`` turns both off); afterwards its modes,
    ``requires_grad`` flags and hooks are as they were.
    """

    views = VIEWS

    def __init__(self, model: torch.nn.Module, processor, prompt: str, efficient_gradients: bool = True,
                 answer: Optional[AnswerInput] = None, answer_reduction: str = "sum", view: str = "combined",
                 chat_template_kwargs: Optional[Dict[str, object]] = None) -> None:
        config = model.config
        self.family = getattr(config, "model_type", None)
        if self.family not in IDEFICS3_FAMILIES:
            raise ValueError(f"Idefics3Wrapper supports model types {', '.join(IDEFICS3_FAMILIES)}, got "
                             f"{self.family!r}.")
        check_prompt(prompt, (processor.image_token,))
        super().__init__(model, processor, efficient_gradients)
        self.image_token_id = int(config.image_token_id)
        self.tile_size = int(processor.image_processor.max_image_size["longest_edge"])
        self.patch_size = int(config.vision_config.patch_size)
        self.scale_factor = int(config.scale_factor)
        cell = self.patch_size * self.scale_factor
        grid = self.tile_size // cell
        if self.tile_size % cell or grid * grid != processor.image_seq_len:
            raise ValueError(f"The processor puts {processor.image_seq_len} image tokens per {self.tile_size} px tile, "
                             f"but the model makes ({self.tile_size} / ({self.patch_size} x {self.scale_factor}))^2 "
                             "of them (patch size x scale_factor): load the model and processor from one checkpoint.")
        self.grid = grid
        self._text_model, self._decoder_layers = find_module_list(model, "embed_tokens")
        self._idefics = next(m for m in model.modules() if hasattr(m, "connector"))
        self.vision_model = self._idefics.vision_model
        _, self._vision_blocks = find_module_list(self.vision_model, "layers")
        self._watch_layers(self._decoder_layers, self._vision_blocks, self._idefics)
        self.view = view
        self._init_prompt_side(prompt, chat_template_kwargs, answer, answer_reduction)

    # ----------------------------------------------------------------------------------------- layers
    @property
    def vision_blocks(self) -> List[torch.nn.Module]:
        """The vision encoder's layers, outputs ``(B x images, (tile / patch)^2, C)``: the tiles, then the global
        image."""
        return list(self._vision_blocks)

    @property
    def connector(self) -> torch.nn.Module:
        """The pixel shuffle and projection: ``(B x images, g^2, C)``, one vector per token of each image."""
        return self._idefics.connector

    @property
    def projector(self) -> torch.nn.Module:
        """What turns the vision encoder's output into the decoder's image tokens: the :attr:`connector`."""
        return self.connector

    @property
    def token_cell(self) -> int:
        """The pixels one image token covers on the canvas: ``patch_size x scale_factor`` of a tile."""
        return self.patch_size * self.scale_factor

    # ----------------------------------------------------------------------------------------- images
    def preprocess(self, image: Union[ImageInput, Sequence[ImageInput]]) -> torch.Tensor:
        """The processor's own resizing and normalisation, as the canvas ``(1, 3, H, W)`` float32 on the CPU: its
        tiles put back together (or its one image, when the picture is not split). A list of pictures asks them all
        in one prompt: their canvases side by side, which :attr:`image_boxes` remembers until the next call."""
        if isinstance(image, (list, tuple)):
            return preprocess_several(self, image, self.preprocess)
        self.image_boxes = None
        encoded = self.processor.image_processor(images=[load_rgb(image)], return_tensors="pt",
                                                 return_row_col_info=True)
        rows, cols = int(encoded["rows"][0][0]), int(encoded["cols"][0][0])
        pixel_values = encoded["pixel_values"].float()
        if rows == 0:
            return pixel_values[:, 0]
        return tiles_to_canvas(pixel_values[0, :rows * cols], rows, cols)

    def processor_global_image(self, image: ImageInput) -> torch.Tensor:
        """The processor's own global image of ``image`` ``(1, 3, tile, tile)`` (resized from the uint8 canvas), which
        ``model_inputs(x, global_images=...)`` takes to reproduce the processor path exactly."""
        encoded = self.processor.image_processor(images=[load_rgb(image)], return_tensors="pt",
                                                 return_row_col_info=True)
        if encoded["rows"][0][0] == 0:
            raise ValueError("This picture is not split into tiles: its one image is the canvas itself.")
        return encoded["pixel_values"][:, -1].float()

    def global_image(self, x: torch.Tensor) -> torch.Tensor:
        """The global image of canvases ``x`` ``(B, 3, H, W)``: resized to one tile with the image processor's filter
        (antialiased, differentiable) as its uint8 resize does it, the width first, then the height, each pass
        clipped to the pixel range (LANCZOS overshoots; clipping only the end differs by up to 10 levels)."""
        from torchvision.transforms.v2 import functional as tvF
        from transformers.image_utils import pil_torch_interpolation_mapping
        from transformers.utils import is_torchvision_greater_or_equal

        resample = self.processor.image_processor.resample
        mode = pil_torch_interpolation_mapping.get(resample, resample)
        lanczos = mode == tvF.InterpolationMode.LANCZOS
        if lanczos and not is_torchvision_greater_or_equal("0.27"):  # the processor's own fallback there
            mode, lanczos = tvF.InterpolationMode.BICUBIC, False
        on_cpu = lanczos and x.device.type != "cpu"  # the processor resizes with LANCZOS on the CPU only
        resized = x.cpu() if on_cpu else x
        for size in ([x.shape[2], self.tile_size], [self.tile_size, self.tile_size]):
            resized = self.clip_to_pixels(tvF.resize(resized, size, interpolation=mode, antialias=True))
        return resized.to(x.device)

    # ----------------------------------------------------------------------------------------- layout
    def layout_for(self, height: int, width: int) -> TileLayout:
        """Text inputs and token positions for canvases of ``height x width`` pixels, built once per size by the
        processor itself from a placeholder picture of that size (which it maps onto the same tiles)."""
        boxes = self.image_boxes
        if boxes is not None:
            check_canvas(boxes, height, width)
        key = (height, width, boxes)
        if key in self._layouts:
            return self._layouts[key]
        sizes = [(h, w) for _, _, h, w in boxes.boxes] if boxes is not None else [(height, width)]
        placeholders = [np.zeros(size + (3,), dtype=np.uint8) for size in sizes]
        tiles = tuple(self._tiling(placeholder) for placeholder in placeholders)
        placeholder = placeholders if boxes is not None else placeholders[0]
        encoded = self.processor(text=[self.chat_text()], images=[placeholder], return_tensors="pt")
        text_inputs, positions, answer_ids = prompt_inputs(self, encoded, placeholder,
                                                           ("pixel_values", "pixel_attention_mask"))
        layout = TileLayout(text_inputs, positions, tiles[0], self.grid, answer_ids, boxes, tiles if boxes else ())
        self._check_markers(layout, text_inputs["input_ids"][0])
        self._layouts[key] = layout
        return layout

    def _tiling(self, placeholder: np.ndarray) -> Tuple[int, int]:
        """The rows and columns of tiles the processor makes of a canvas (``(0, 0)``: one unsplit image), refusing
        a size that is no canvas of it."""
        height, width = placeholder.shape[:2]
        geometry = self.processor.image_processor(images=[placeholder], return_row_col_info=True)
        rows, cols = int(geometry["rows"][0][0]), int(geometry["cols"][0][0])
        s = self.tile_size
        canvas = (rows * s, cols * s) if rows else (s, s)
        if canvas != (height, width):
            raise ValueError(f"A {height}x{width} input is not a canvas of this processor (it makes a picture of that "
                             f"size into {rows}x{cols} tiles of {s} px, a {canvas[0]}x{canvas[1]} canvas): prepare "
                             "images with wrapper.preprocess(image).")
        return rows, cols

    def _check_markers(self, layout: TileLayout, ids: torch.Tensor) -> None:
        """Each image's tokens must be one run that follows its marker: ``<row_i_col_j>`` for tile ``(i, j)``,
        ``<global-img>`` for the global (or one) image, picture after picture."""
        n = self.grid ** 2
        convert = self.processor.tokenizer.convert_tokens_to_ids
        markers = [marker for rows, cols in layout.image_tiles or (layout.tiles,) for marker in
                   [f"<row_{i + 1}_col_{j + 1}>" for i in range(rows) for j in range(cols)] + ["<global-img>"]]
        positions = layout.image_positions
        runs = positions.reshape(-1, n) if len(positions) == n * len(markers) else None
        if runs is None or bool((runs[:, 1:] - runs[:, :-1] != 1).any()) or \
                [int(ids[r[0] - 1]) for r in runs] != [convert(m) for m in markers]:
            raise RuntimeError(f"The processor laid out {len(positions)} image tokens otherwise than {len(markers)} "
                               f"runs of {n} after the markers {markers[0]} ... {markers[-1]}: this transformers "
                               f"version builds {self.family} prompts differently.")

    # ----------------------------------------------------------------------------------------- forward
    def model_inputs(self, x: torch.Tensor,
                     global_images: Optional[Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]] = None
                     ) -> Dict[str, torch.Tensor]:
        """The model's keyword inputs for canvases ``x`` ``(B, 3, H, W)`` on the input device: the processor's text
        inputs of this size and ``pixel_values`` ``(B, images, 3, tile, tile)`` in the vision encoder's dtype: the
        tiles cut from the canvas and the global image (resized in torch, or ``global_images`` ``(B or 1, 3, tile,
        tile)``, e.g. :meth:`processor_global_image`); or the canvas itself when it is one tile. Several pictures in
        one prompt: each picture's images in turn (``global_images``: one per picture, ``None`` for an unsplit one)."""
        b, _, height, width = x.shape
        layout = self.layout_for(height, width)
        device = self.input_device
        inputs = {k: v.to(device).expand(b, -1) for k, v in layout.text_inputs.items()}
        x = x.to(device)
        images = encode_pictures(x, layout, self._encoder_images, global_images)
        images = images.to(next(self.vision_model.parameters()).dtype)
        # The model drops images that are all 0 (batch padding): give such an image a negligible non-zero pixel.
        empty = (images == 0).flatten(2).all(-1)
        if bool(empty.any()):
            nudge = torch.zeros_like(images)
            nudge[:, :, 0, 0, 0] = empty * torch.finfo(images.dtype).tiny
            images = images + nudge
        inputs["pixel_values"] = images
        return inputs

    def _encoder_images(self, x: torch.Tensor, tiles: Tuple[int, int],
                        global_images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One picture's canvases ``(B, 3, H, W)`` as the encoder's images ``(B, count, 3, tile, tile)``: its tiles
        and global image (resized in torch, or ``global_images``), or the canvas itself when it is one tile."""
        if tiles == (0, 0):
            return x[:, None]
        whole = self.global_image(x) if global_images is None else global_images.to(x).expand(len(x), -1, -1, -1)
        return torch.cat([canvas_to_tiles(x, *tiles), whole[:, None]], dim=1)

    # ----------------------------------------------------------------------------------------- reshape
    def reshape_transform(self, output) -> torch.Tensor:
        """Hidden states to ``(B, C, h, w)`` float32 on the canvas's grid of the latest forward pass (``(B, 2C, h,
        w)`` for the ``"combined"`` view of a split canvas).

        Decoder layers ``(B, seq, C)`` (or a tuple whose first item is that) are read at the image positions, the
        connector's output ``(B x images, g^2, C)`` and vision blocks' ``(B x images, (tile / patch)^2, C)`` by rows;
        each image's tokens form its square grid, the tiles' put side by side on the canvas.
        """
        hidden = output[0] if isinstance(output, tuple) else output
        layout = self.layout
        if layout is None:
            raise RuntimeError("reshape_transform needs a forward pass of the wrapper first.")
        b, images = self.batch_size, layout.image_count
        patches = (self.tile_size // self.patch_size) ** 2
        if hidden.dim() == 3 and hidden.shape[0] == b and hidden.shape[1] == layout.sequence_length:
            tokens = hidden[:, layout.image_positions.to(hidden.device)]
        elif hidden.dim() == 3 and hidden.shape[0] == b * images and hidden.shape[1] in (self.grid ** 2, patches):
            tokens = hidden
        else:
            raise ValueError(f"Cannot map a hidden state of shape {tuple(hidden.shape)} to the canvas: expected "
                             f"({b}, {layout.sequence_length}, C) from a decoder layer or ({b * images}, "
                             f"{self.grid ** 2} or {patches}, C) from the connector or a vision block.")
        tokens = tokens.float().reshape(b, images, -1, hidden.shape[-1])
        if layout.boxes is None:
            return self._place(tokens, layout.tiles)
        grids = [self._place(part, tiles)
                 for part, tiles in zip(tokens.split(layout.image_counts, dim=1), layout.image_tiles)]
        return place_padded(grids, layout.boxes, self.tile_size // math.isqrt(tokens.shape[2]))

    def _place(self, tokens: torch.Tensor, tiles: Tuple[int, int]) -> torch.Tensor:
        """One picture's ``(B, images, side^2, C)`` tokens to the view's grid on its canvas ``(B, C or 2C, rows*side,
        cols*side)``: tiles side by side, the global image resized (bilinear) over the whole canvas."""
        b, _, count, channels = tokens.shape
        side = math.isqrt(count)
        grids = tokens.reshape(b, -1, side, side, channels)
        if tiles == (0, 0):
            return grids[:, -1].permute(0, 3, 1, 2)
        return self.place_views(*tile_grids(grids, tiles))

    # ----------------------------------------------------------------------------------------- attention
    def token_geometry(self) -> Tuple[int, torch.Tensor, Tuple[int, int]]:
        """For attention maps: the query position (the last), the global image's token positions in raster order
        (of the one image when unsplit) and their grid; :meth:`image_row_to_grid` places the tiles' too."""
        if self.layout is None:
            raise RuntimeError("token_geometry needs a forward pass of the wrapper first.")
        return -1, self.layout.global_positions, (self.grid, self.grid)

    # ----------------------------------------------------------------------------------------- ablation
    @property
    def view_positions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The tiles' token positions and the global image's (unsplit: the one image's for both)."""
        layout = self.layout
        return (layout.tile_positions if layout.split else layout.global_positions), layout.global_positions
