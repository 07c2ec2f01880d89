"""InternVL adapter (transformers' ``internvl`` model type, the ``-hf`` checkpoints such as InternVL3-1B-hf):
:class:`QwenVLWrapper`'s contract on dynamic tiles, a thumbnail and a pixel shuffle.

What the family changes, and where it is handled:

- **Dynamic tiles and a thumbnail.** The processor (``GotOcr2ImageProcessor`` with ``crop_to_patches``) picks the grid
  of ``rows x cols`` tiles of the encoder's ``image_size`` (448 px) whose aspect ratio is closest to the picture's,
  among ``min_patches..max_patches`` tiles (``get_optimal_tiled_canvas``), resizes (stretches: no letterbox) the
  picture to ``rows * 448 x cols * 448``, the *canvas*, and cuts it into tiles in raster order. With more than one
  tile it adds a *thumbnail*, the whole picture resized to one tile. :meth:`InternVLWrapper.preprocess` returns the
  canvas (the processor's tiles put back together); ``forward`` cuts it into the tiles again and builds the thumbnail
  in torch (:meth:`InternVLWrapper.model_inputs`).
- **Pixel shuffle.** The vision encoder (patch 14: 32x32 patches per tile, a class token first) feeds the hidden state
  of ``vision_feature_layer`` (usually -1, the last block), less the class token (strategy ``"default"``), to
  ``pixel_shuffle`` with ``downsample_ratio`` 0.5: each 2x2 block of patches becomes one token of 4x the channels,
  16x16 tokens per tile in raster order (one token per 28x28 px), then the projector. The maps of decoder layers and
  of the projector lie on that token grid; those of vision blocks on the finer patch grid (14 px).
- **Prompt.** Each image becomes ``<img>`` + ``image_seq_length`` (256) ``<IMG_CONTEXT>`` tokens per tile, the tiles'
  first and the thumbnail's last, + ``</img>``. The wrapper has the processor build it once per canvas size.

The thumbnail: the processor resizes it from the original picture; ``forward`` resizes the canvas instead (bicubic,
antialiased, clipped to the pixel range as the processor's uint8 resize is; differentiable), one resampling more, so
the logits differ from the processor path. Measured on the tiny test model (logits of standard deviation ~0.16),
``tests/models/test_internvl.py``'s ``shapes_image`` and ``random_image`` (seeds 0-2) in 8 sizes from 40x70 to
90x120 (1x2, 2x1, 2x2, 3x1, 1x3 and 2x3 tiles), the wrapper against the model on ``chat_inputs``: at most 3.0e-4 on
pictures of filled discs, 1.9e-3 on random-noise pictures, whose energy lies where two resamplings differ most; the
thumbnail of another picture moves the logits by 0.05 to 0.1. At the released geometry (448-px tiles of 14-px
patches, widths 1024 and 896, 2 vision and 3 decoder layers of random weights, logits of standard deviation ~0.6),
random-noise pictures of 300x500 (2x3 tiles) and 800x600 (4x3 tiles) gave 1.1e-2 and 2.7e-3, and 0 with the
processor's thumbnail. Fed the processor's own thumbnail (``model_inputs(x,
thumbnails=processor_thumbnail(image))``) the wrapper's input equals the processor's exactly (tiles compared bit for
bit) and so do the logits (difference 0 measured; tested to 1e-5); that thumbnail is a constant, though, which
changes to the canvas do not reach.

``view`` chooses which image tokens draw the maps, all on the canvas's grid: ``"tiles"`` (each tile's tokens on its
rectangle of the canvas), ``"thumbnail"`` (the thumbnail's tokens over the whole canvas, resized bilinearly) or
``"combined"`` (default: both, stacked as channels ``(B, 2C, h, w)``, so that grad-cam's channel sum gives the sum of
the two maps before its ReLU, as LLaVA's anyres views do, see :mod:`pytorch_grad_cam_vlm.models.anyres`). A one-tile
canvas has no thumbnail: its one tile is the whole picture, and every view draws it. The placing is
:mod:`pytorch_grad_cam_vlm.models.tiles`' (shared with Gemma 3 and Idefics3), not LLaVA's ``anyres.place_views``:
InternVL has no letterbox, unpadding or newline tokens.

Several images in one prompt: ``preprocess([a, b])`` lays each picture's canvas of tiles side by side
(:mod:`pytorch_grad_cam_vlm.models.multi_image`); ``forward`` gives the encoder each picture's tiles and thumbnail in
the prompt's order, the processor writes one ``<img>...</img>`` block per picture (built from placeholders of the
pictures' own sizes, so that it tiles them as ``preprocess`` did), and each picture's view lands on its box.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.models.answer_text import prompt_inputs
from pytorch_grad_cam_vlm.models.anyres import feature_blocks
from pytorch_grad_cam_vlm.models.base import DecoderLayers, ModelWrapper, find_module_list
from pytorch_grad_cam_vlm.models.multi_image import check_canvas, encode_pictures, place_padded, preprocess_several
from pytorch_grad_cam_vlm.models.qwen_vl import AnswerInput, QwenPromptSide, check_prompt
from pytorch_grad_cam_vlm.models.tiles import TiledLayout, TileViews, canvas_to_tiles, tile_grids, tiles_to_canvas

VIEWS = ("tiles", "thumbnail", "combined")


@dataclass
class InternVLLayout(TiledLayout):
    """InternVL's layout: a thumbnail follows the tiles of a picture of more than one tile."""

    @staticmethod
    def whole_images(tiles: Tuple[int, int]) -> int:
        """A thumbnail where there is more than one tile."""
        return int(tiles[0] * tiles[1] > 1)

    @property
    def thumbnail(self) -> bool:
        """Whether the processor adds a thumbnail: when there is more than one tile."""
        return bool(self.whole_images(self.tiles))

    @property
    def tile_positions(self) -> torch.Tensor:
        """Positions of the tiles' tokens, tile after tile, each in raster order."""
        return self.image_positions[:self.tiles[0] * self.tiles[1] * self.grid ** 2]

    @property
    def thumbnail_positions(self) -> torch.Tensor:
        """Positions of the thumbnail's tokens in raster order (none for a one-tile canvas)."""
        return self.image_positions[self.tiles[0] * self.tiles[1] * self.grid ** 2:]


class InternVLWrapper(QwenPromptSide, TileViews, DecoderLayers, ModelWrapper):
    """InternVL (transformers' ``internvl``: InternVL2.5 and InternVL3 ``-hf`` checkpoints) as an image classifier
    over the vocabulary, for grad-cam.

    ``forward(x)`` takes normalised canvases ``(B, 3, H, W)`` of whole tiles, as :meth:`preprocess` makes them (see the
    module's docstring), and returns the logits of the next token after the chat-formatted ``prompt``, ``(B, vocab)``
    float32, or with an ``answer`` its score ``(B, 1)`` (as :class:`QwenVLWrapper`). :meth:`reshape_transform` maps
    decoder layers, :attr:`vision_blocks` and the :attr:`projector` onto the canvas; ``view`` (``"tiles"``,
    ``"thumbnail"`` or ``"combined"``) chooses which tokens draw the map.

    While a forward pass runs, the model is in eval mode with frozen parameters, and no autograd graph is built
    before the shallowest hooked layer (``efficient_gradients=False`` turns both off); afterwards its modes,
    ``requires_grad`` flags and hooks are as they were.
    """

    views = VIEWS

    def __init__(self, model: torch.nn.Module, processor, prompt: str, efficient_gradients: bool = True,
                 answer: Optional[AnswerInput] = None, answer_reduction: str = "sum", view: str = "combined",
                 chat_template_kwargs: Optional[Dict[str, object]] = None) -> None:
        config = model.config
        if getattr(config, "model_type", None) != "internvl":
            raise ValueError(f"InternVLWrapper supports model type 'internvl', got "
                             f"{getattr(config, 'model_type', None)!r}.")
        check_prompt(prompt, (processor.image_token, processor.start_image_token))
        super().__init__(model, processor, efficient_gradients)
        vision_config = config.vision_config
        self.tile_size = int(vision_config.image_size[0])
        self.patch_size = int(vision_config.patch_size[0])
        self.patch_grid = self.tile_size // self.patch_size  # patches per tile side
        self.token_grid = int(self.patch_grid * config.downsample_ratio)  # tokens per tile side
        size = processor.image_processor.size
        if (size.height, size.width) != (self.tile_size, self.tile_size) or \
                processor.image_seq_length != self.token_grid ** 2:
            raise ValueError(f"The processor makes {size.height}x{size.width} tiles of {processor.image_seq_length} "
                             f"tokens but the model takes {self.tile_size}x{self.tile_size} tiles of "
                             f"{self.token_grid ** 2}: load both from one checkpoint.")
        self.image_token_id = int(config.image_token_id)
        self._text_model, self._decoder_layers = find_module_list(model, "embed_tokens")
        self._internvl = next(m for m in model.modules() if hasattr(m, "multi_modal_projector"))
        blocks = self._internvl.vision_tower.encoder.layer
        # Blocks after the deepest feature layer reach nothing (their gradient is zero): they are left out.
        self._vision_blocks = blocks[:feature_blocks(config.vision_feature_layer, len(blocks))[-1] + 1]
        self._watch_layers(self._decoder_layers, blocks, self._internvl)
        self.view = view
        self.source_sizes: Tuple[Tuple[int, int], ...] = ()  # several pictures: their (h, w), set by preprocess
        self._init_prompt_side(prompt, chat_template_kwargs, answer, answer_reduction)

    # ----------------------------------------------------------------------------------------- layers
    @property
    def vision_blocks(self) -> List[torch.nn.Module]:
        """The vision encoder's layers up to the deepest feature layer (all of them with ``vision_feature_layer``
        -1), outputs ``(B x images, 1 + patches, C)``: the class token, then each tile's (and the thumbnail's)
        patches in raster order."""
        return list(self._vision_blocks)

    @property
    def projector(self) -> torch.nn.Module:
        """The multimodal projector, after the pixel shuffle: one vector per token, ``(B x images, tokens, C)``."""
        return self._internvl.multi_modal_projector

    @property
    def token_cell(self) -> int:
        """The pixels one image token covers on the canvas: 2x2 patches (28 px at 448 / 14)."""
        return self.tile_size // self.token_grid

    # ----------------------------------------------------------------------------------------- images
    def preprocess(self, image: Union[ImageInput, Sequence[ImageInput]]) -> torch.Tensor:
        """The processor's own resizing and normalisation, as the canvas ``(1, 3, rows * s, cols * s)`` float32 on
        the CPU: the processor's tiles put back together. Accepts a path, a PIL image or a uint8 array. A list of
        pictures asks them all in one prompt: their canvases side by side, which :attr:`image_boxes` (and
        :attr:`source_sizes`) remember until the next call."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        if isinstance(image, (list, tuple)):
            return preprocess_several(self, image, self.preprocess)
        self.image_boxes = None
        rgb = load_rgb(image)
        image_processor, s = self.processor.image_processor, self.tile_size
        pixel_values = self._processor_images(rgb)
        cols, rows = get_optimal_tiled_canvas((rgb.size[1], rgb.size[0]), (s, s), image_processor.min_patches,
                                              image_processor.max_patches)
        if len(pixel_values) != rows * cols + int(rows * cols > 1):
            raise RuntimeError(f"The processor made {len(pixel_values)} images of a {rows}x{cols} tiling where the "
                               f"wrapper expects {rows * cols} tiles and a thumbnail: this image processor "
                               f"({type(image_processor).__name__}) tiles differently.")
        return tiles_to_canvas(pixel_values[:rows * cols].float(), rows, cols)

    def processor_thumbnail(self, image: ImageInput) -> torch.Tensor:
        """The processor's own thumbnail of ``image``, ``(1, 3, s, s)``: resized from the original picture, which
        ``model_inputs(x, thumbnails=...)`` takes to reproduce the processor path exactly."""
        pixel_values = self._processor_images(load_rgb(image))
        if len(pixel_values) == 1:
            raise ValueError("This picture fits one tile: the processor adds no thumbnail.")
        return pixel_values[-1:].float()

    def _processor_images(self, rgb) -> torch.Tensor:
        """The processor's tiles and thumbnail of a picture, as the processor (``crop_to_patches``) makes them."""
        return self.processor.image_processor(images=[rgb], crop_to_patches=True, return_tensors="pt")["pixel_values"]

    # ----------------------------------------------------------------------------------------- layout
    def layout_for(self, height: int, width: int) -> InternVLLayout:
        """Text inputs and token geometry for canvases of ``height x width`` pixels, built once per size by the
        processor itself with a placeholder picture (tiled to exactly this grid), so that token counts are exact."""
        s, image_processor = self.tile_size, self.processor.image_processor
        if self.image_boxes is not None:
            check_canvas(self.image_boxes, height, width)
            return self._several_layout()
        rows, cols = height // s, width // s
        low, high = image_processor.min_patches, image_processor.max_patches
        if height % s or width % s or not low <= rows * cols <= high:
            raise ValueError(f"A {height}x{width} input is not a canvas of {low} to {high} whole {s}-pixel tiles: "
                             "prepare images with wrapper.preprocess(image).")
        if (height, width) not in self._layouts:
            placeholder = np.zeros((height, width, 3), dtype=np.uint8)
            encoded = self.processor(text=[self.chat_text()], images=[placeholder], min_patches=rows * cols,
                                     max_patches=rows * cols, return_tensors="pt")
            text_inputs, positions, answer_ids = prompt_inputs(self, encoded, placeholder, ("pixel_values",))
            layout = InternVLLayout(text_inputs, positions, (rows, cols), self.token_grid, answer_ids)
            if len(positions) != layout.image_count * self.token_grid ** 2:
                raise RuntimeError(f"The processor placed {len(positions)} image tokens where the wrapper expects "
                                   f"{layout.image_count * self.token_grid ** 2}: this transformers version packs "
                                   "InternVL images differently.")
            self._layouts[(height, width)] = layout
        return self._layouts[(height, width)]

    def _several_layout(self) -> InternVLLayout:
        """The layout of several pictures in one prompt (:attr:`image_boxes`), built once per set of pictures by the
        processor with placeholders of the pictures' own sizes (:attr:`source_sizes`), so that it tiles each one as
        :meth:`preprocess` did."""
        boxes, sizes, s = self.image_boxes, self.source_sizes, self.tile_size
        if (boxes, sizes) not in self._layouts:
            placeholders = [np.zeros(tuple(size) + (3,), dtype=np.uint8) for size in sizes]
            encoded = self.processor(text=[self.chat_text()], images=[placeholders], return_tensors="pt")
            text_inputs, positions, answer_ids = prompt_inputs(self, encoded, placeholders, ("pixel_values",))
            tiles = tuple((h // s, w // s) for _, _, h, w in boxes.boxes)
            layout = InternVLLayout(text_inputs, positions, tiles[0], self.token_grid, answer_ids, boxes, tiles)
            if len(sizes) != len(boxes) or len(positions) != layout.image_count * self.token_grid ** 2:
                raise ValueError("The pictures of this canvas were not prepared together: preprocess them again "
                                 "(wrapper.preprocess([a, b])).")
            self._layouts[(boxes, sizes)] = layout
        return self._layouts[(boxes, sizes)]

    # ----------------------------------------------------------------------------------------- forward
    def model_inputs(self, x: torch.Tensor,
                     thumbnails: Optional[Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]] = None
                     ) -> Dict[str, torch.Tensor]:
        """The model's keyword inputs for canvases ``x`` ``(B, 3, H, W)`` on the input device: the processor's text
        inputs of this size and ``pixel_values`` in the encoder's dtype, per sample the tiles (crops of the canvas)
        and, with more than one tile, the thumbnail: the canvas resized in torch (differentiable), or ``thumbnails``
        ``(B or 1, 3, s, s)``, e.g. :meth:`processor_thumbnail`. Several pictures in one prompt: each picture's tiles
        and thumbnail in turn (``thumbnails``: one per picture, ``None`` for a one-tile one)."""
        b, _, height, width = x.shape
        layout = self.layout_for(height, width)
        device = self.input_device
        inputs = {k: v.to(device).expand(b, -1) for k, v in layout.text_inputs.items()}
        x = x.to(device)
        images = encode_pictures(x, layout, self._encoder_images, thumbnails)
        s = self.tile_size
        inputs["pixel_values"] = images.reshape(-1, 3, s, s).to(next(self._vision_blocks.parameters()).dtype)
        return inputs

    def _encoder_images(self, x: torch.Tensor, tiles: Tuple[int, int],
                        thumbnail: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One picture's canvases ``(B, 3, H, W)`` as the encoder's images ``(B, count, 3, s, s)``: its tiles and,
        with more than one, its thumbnail (the canvas resized in torch, or ``thumbnail``)."""
        s, (rows, cols) = self.tile_size, tiles
        images = canvas_to_tiles(x, rows, cols)
        if rows * cols > 1:
            if thumbnail is None:
                # the processor's resize works on uint8 pixels, so its overshoot at edges is clipped to 0..255
                thumbnail = self.clip_to_pixels(F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False,
                                                              antialias=True))
            images = torch.cat([images, thumbnail.to(x).expand(len(x), -1, -1, -1)[:, None]], dim=1)
        elif thumbnail is not None:
            raise ValueError("A one-tile canvas has no thumbnail: call model_inputs(x) without thumbnails.")
        return images

    # ----------------------------------------------------------------------------------------- reshape
    def reshape_transform(self, output) -> torch.Tensor:
        """Hidden states to ``(B, C, h, w)`` float32 on the canvas of the latest forward pass (``(B, 2C, h, w)`` for
        the ``"combined"`` view of a canvas of several tiles).

        Layers are told by their shape (:meth:`hidden_shapes`). Decoder layers ``(B, seq, C)`` (or a tuple whose
        first item is that) are read at the image positions and the projector ``(B x images, tokens, C)`` by rows:
        one cell per token (``token_cell`` pixels). Vision blocks ``(B x images, 1 + patches, C)`` lose the class
        token: one cell per patch. Each tile's grid lies on its rectangle of the canvas, the thumbnail's over the
        whole canvas, as ``view`` says.
        """
        hidden = output[0] if isinstance(output, tuple) else output
        shapes = self.hidden_shapes()
        kind = next((kind for kind, shape in shapes.items() if tuple(hidden.shape) == shape), None)
        if kind is None:
            raise ValueError(f"Cannot map a hidden state of shape {tuple(hidden.shape)} to the canvas: expected "
                             f"{shapes['decoder']} from a decoder layer, {shapes['projector']} from the projector "
                             f"or {shapes['vision']} from a vision block.")
        return self._on_canvas(hidden, kind)

    def _on_canvas(self, hidden: torch.Tensor, kind: str) -> torch.Tensor:
        """A hidden state of a ``kind`` of layer (see :meth:`hidden_shapes`) placed on the canvas as ``view`` says."""
        layout, b = self.layout, self.batch_size
        if kind == "decoder":
            hidden, n = hidden[:, layout.image_positions.to(hidden.device)], self.token_grid
        else:  # the class token, where there is one, comes first
            n = self.token_grid if kind == "projector" else self.patch_grid
            hidden = hidden[:, hidden.shape[1] - n * n:]
        per_image = hidden.reshape(b, layout.image_count, n, n, -1).float()
        if layout.boxes is None:
            return self.place_views(*tile_grids(per_image, layout.tiles))
        grids = [self.place_views(*tile_grids(part, tiles))
                 for part, tiles in zip(per_image.split(layout.image_counts, dim=1), layout.image_tiles)]
        return place_padded(grids, layout.boxes, self.tile_size // n)

    def hidden_shapes(self) -> Dict[str, Tuple[int, int, int]]:
        """The shapes of the hidden states of the latest forward pass: ``"decoder"`` ``(B, seq, C_text)``,
        ``"projector"`` ``(B x images, tokens, C_text)`` and ``"vision"`` blocks ``(B x images, 1 + patches,
        C_vision)``. Layers are told apart by all three sizes: a one-tile prompt can be as long as a tile's patches."""
        layout = self.layout
        if layout is None:
            raise RuntimeError("reshape_transform needs a forward pass of the wrapper first.")
        b, images, g, p = self.batch_size, layout.image_count, self.token_grid, self.patch_grid
        text, vision = self.model.config.text_config.hidden_size, self.model.config.vision_config.hidden_size
        return {"decoder": (b, layout.sequence_length, text), "projector": (b * images, g * g, text),
                "vision": (b * images, p * p + 1, vision)}

    # ----------------------------------------------------------------------------------------- attention
    def token_geometry(self) -> Tuple[int, torch.Tensor, Tuple[int, int]]:
        """For attention maps: the query position (the last), the thumbnail's token positions in raster order (a
        one-tile canvas: its tile's) and their grid."""
        return -1, self.view_positions[1], (self.token_grid, self.token_grid)

    def image_row_to_grid(self, row: torch.Tensor) -> torch.Tensor:
        """A value per sequence position ``(B, seq)`` (e.g. the query's attention) to ``(B, 1, h, w)`` on the
        canvas's token grid: the view's tokens placed as for hidden states; ``"combined"`` adds the two."""
        return self._on_canvas(row[..., None].float(), "decoder").sum(1, keepdim=True)

    # ----------------------------------------------------------------------------------------- ablation
    @property
    def view_positions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The tiles' token positions and the thumbnail's (a one-tile canvas: its tile's for both)."""
        layout = self.layout
        return layout.tile_positions, layout.thumbnail_positions if layout.thumbnail else layout.tile_positions

