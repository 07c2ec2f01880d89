"""LLaVA 1.5, LLaVA-NeXT and LLaVA-OneVision adapter: :class:`QwenVLWrapper`'s contract on the LLaVA family.

What the family changes, and where it is handled:

- **Vision tower.** A CLIP (LLaVA 1.5, LLaVA-NeXT) or SigLIP (OneVision) encoder on square images of its
  ``image_size``. The language model reads the hidden state of ``config.vision_feature_layer`` (an index into the
  encoder's hidden states, may be negative, or a list whose states are concatenated), less the class token under
  strategy ``"default"``, through ``multi_modal_projector``. Blocks after the deepest feature layer reach nothing
  (LLaVA 1.5 and NeXT read the last block but one): their gradient is zero, their gradient maps are blank, and
  hooking them warns with the blocks to use.
- **LLaVA 1.5.** One square image (``(image_size / patch_size)^2`` tokens, 24x24 at 336 px): :meth:`preprocess` is the
  processor's resize and center crop, and ``forward`` takes that square size.
- **LLaVA-NeXT and OneVision ("anyres").** A base image and tiles of a letterboxed canvas, packed as
  :mod:`pytorch_grad_cam_vlm.models.anyres` describes; OneVision tiles only when a sample holds one image.
- **Several pictures in one prompt** (``preprocess([a, b])``, :mod:`pytorch_grad_cam_vlm.models.multi_image`): each
  picture's input as the processor makes it with the others (LLaVA 1.5's square, LLaVA-NeXT's canvas, OneVision's
  picture padded to a square and resized, untiled) side by side; ``forward`` gives the encoder each picture's images
  in turn, with the text from the processor for pictures of their own sizes.

How the wrapper explains an anyres model: ``forward`` takes the canvas ``(B, 3, H, W)`` (what :meth:`preprocess`
returns: the processor's own tiles put back together) and builds the model's input from it in torch: the tiles are
crops of the canvas, exactly the processor's, and the base image is the canvas's picture area (the letterbox left
out) resized to the encoder's size with ``torch.nn.functional.interpolate`` (bicubic, antialiased, clipped to the
pixel range as the processor's uint8 resize is; differentiable). The processor resizes the base image from the
original picture instead, one resampling fewer, so the logits differ from the processor path. Measured on the tiny
test models (logits of standard deviation ~0.15) over 24 pictures of filled discs in 8 sizes: at most 2.9e-3
(NeXT) and 1.6e-3 (OneVision); on random-noise pictures, whose energy lies at the highest frequencies where two
resamplings differ most, up to 5e-2. Resizing the whole canvas, bars included, would differ by 0.3. Fed the
processor's own base image (``model_inputs(x, base_images=processor_base_image(image))``), the wrapper's input
equals the processor's exactly and so do the logits (difference 0 measured; tested to 1e-5); that base image is a
constant, though, which changes to the canvas do not reach.

The unpadding needs the picture's size before resizing, :attr:`source_size`: :meth:`preprocess` sets it, or set it
yourself; when it is ``None`` the canvas is taken as the picture itself (no letterbox). The maps lie on the canvas's
grid of tile tokens, drawn by the tokens ``view`` names: ``"tiles"`` (fine), ``"base"`` (coarse) or ``"combined"``
(default, their sum before grad-cam's ReLU); :mod:`pytorch_grad_cam_vlm.models.anyres` says how they are placed.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.models.answer_text import prompt_inputs
from pytorch_grad_cam_vlm.models.anyres import (VIEWS, LlavaLayout, content_box, decoder_grids, feature_blocks,
                                                input_boxes, pictures_layout, place_pictures, place_views,
                                                set_anyres_geometry, vision_grids)
from pytorch_grad_cam_vlm.models.base import DecoderLayers, ModelWrapper, find_module_list
from pytorch_grad_cam_vlm.models.clip import find_vision_tower
from pytorch_grad_cam_vlm.models.frame import ImageFrame, processor_frame
from pytorch_grad_cam_vlm.models.multi_image import check_canvas, crops, encode_pictures, preprocess_several
from pytorch_grad_cam_vlm.models.qwen_vl import AnswerInput, QwenPromptSide, check_prompt
from pytorch_grad_cam_vlm.models.tiles import TileViews, canvas_to_tiles, tiles_to_canvas
from pytorch_grad_cam_vlm.models.state import has_forward_hooks

LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision")


class LlavaWrapper(QwenPromptSide, TileViews, DecoderLayers, ModelWrapper):
    """LLaVA 1.5, LLaVA-NeXT or LLaVA-OneVision as an image classifier over the vocabulary, for grad-cam.

    ``forward(x)`` takes normalised images ``(B, 3, H, W)``, as :meth:`preprocess` makes them: LLaVA 1.5's square crop
    of the encoder's size, or an anyres model's canvas at its best resolution (see the module's docstring), and
    returns the logits of the next token after the chat-formatted ``prompt``, ``(B, vocab)`` float32, or with an
    ``answer`` its score ``(B, 1)`` (as :class:`QwenVLWrapper`). The prompt's tokens are built by the model's own
    processor and chat template once per input size (and ``source_size``).

    :meth:`reshape_transform` maps decoder layers, :attr:`vision_blocks` and the :attr:`projector` onto the input's
    token grid; for anyres models ``view`` (``"tiles"``, ``"base"`` or ``"combined"``) chooses which tokens draw
    the map. :class:`~pytorch_grad_cam_vlm.AttentionMap` reads the last position's attention to the same tokens.

    While a forward pass runs, the model is in eval mode with frozen parameters, and no autograd graph is built
    before the shallowest hooked layer (``efficient_gradients=False`` turns both off); afterwards its modes,
    ``requires_grad`` flags and hooks are as they were.
    """

    views = VIEWS

    def __init__(self, model: torch.nn.Module, processor, prompt: str, efficient_gradients: bool = True,
                 answer: Optional[AnswerInput] = None, answer_reduction: str = "sum", view: str = "combined",
                 source_size: Optional[Tuple[int, int]] = None,
                 chat_template_kwargs: Optional[Dict[str, object]] = None) -> None:
        config = model.config
        self.family = getattr(config, "model_type", None)
        if self.family not in LLAVA_FAMILIES:
            raise ValueError(f"LlavaWrapper supports model types {', '.join(LLAVA_FAMILIES)}, got {self.family!r}.")
        check_prompt(prompt, (getattr(processor, "image_token", "<image>"),))
        super().__init__(model, processor, efficient_gradients)
        self.image_token_id = int(config.image_token_id)
        vision_config = config.vision_config
        self.tile_size = int(vision_config.image_size)
        self.patch_size = int(vision_config.patch_size)
        self.anyres = self.family != "llava"
        self.pinpoints = [tuple(int(v) for v in p) for p in config.image_grid_pinpoints] if self.anyres else []
        if self.anyres:
            own = [tuple(int(v) for v in p) for p in processor.image_processor.image_grid_pinpoints]
            if own != self.pinpoints:
                raise ValueError(f"The processor tiles on {own} but the model expects {self.pinpoints} "
                                 "(image_grid_pinpoints): load both from one checkpoint.")
        self._modeling = importlib.import_module(type(model).__module__)  # the family's own anyres functions
        self._text_model, self._decoder_layers = find_module_list(model, "embed_tokens")
        self.vision_tower, self._vision_blocks = find_vision_tower(model)
        self._llava = next(m for m in model.modules() if hasattr(m, "multi_modal_projector"))
        self.class_token = int(hasattr(self.vision_tower.embeddings, "class_embedding"))
        self.feature_blocks = feature_blocks(config.vision_feature_layer, len(self._vision_blocks))
        self._watch_layers(self._decoder_layers, self._vision_blocks, self._llava)
        self.view = view
        self.source_size = None if source_size is None else (int(source_size[0]), int(source_size[1]))
        self.source_sizes: Tuple[Tuple[int, int], ...] = ()  # several pictures: their (h, w), set by preprocess
        self._init_prompt_side(prompt, chat_template_kwargs, answer, answer_reduction)

    # ----------------------------------------------------------------------------------------- layers
    @property
    def vision_blocks(self) -> List[torch.nn.Module]:
        """The vision tower's encoder layers, outputs ``(images x (1 + tiles), [class token +] patches, C)``. Blocks
        after the deepest feature layer (``feature_blocks[-1]``) reach nothing: their gradient maps are blank."""
        return list(self._vision_blocks)

    @property
    def projector(self) -> torch.nn.Module:
        """The multimodal projector: one vector per patch (and class token under strategy ``"full"``), before the
        anyres packing."""
        return self._llava.multi_modal_projector

    @property
    def token_cell(self) -> int:
        """The pixels one image token covers on the input: a patch of the vision tower (of a tile, for anyres)."""
        return self.patch_size

    # ----------------------------------------------------------------------------------------- images
    def preprocess(self, image: Union[ImageInput, Sequence[ImageInput]]) -> torch.Tensor:
        """The processor's own resizing and normalisation, as ``(1, 3, H, W)`` float32 on the CPU: LLaVA 1.5's
        resize and center crop; for anyres models the canvas, the processor's tiles put back together at the best
        resolution. Sets :attr:`source_size` to the picture's size (anyres), which the unpadding needs: explain an
        image before preprocessing another of a different aspect ratio. A list of pictures asks them all in one
        prompt: each one's input side by side, which :attr:`image_boxes` (and :attr:`source_sizes`) remember until
        the next call."""
        if isinstance(image, (list, tuple)):
            return preprocess_several(self, image, self._several_input)
        self.image_boxes = None
        rgb = load_rgb(image)
        encoded = self.processor.image_processor(images=[rgb], return_tensors="pt")
        pixel_values = encoded["pixel_values"].float()
        if not self.anyres:
            return pixel_values
        height, width = (int(v) for v in encoded["image_sizes"][0])
        canvas_h, canvas_w = self.canvas_size((height, width))
        rows, cols = canvas_h // self.tile_size, canvas_w // self.tile_size
        self.source_size = (height, width)
        return tiles_to_canvas(pixel_values[0, 1:1 + rows * cols], rows, cols)

    def _several_input(self, rgb) -> torch.Tensor:
        """One picture's input among several: OneVision's as the processor's several-image mode makes it (a sample
        of two, untiled), the others' as :meth:`preprocess` makes one picture's."""
        if self.family == "llava_onevision":
            return self.processor.image_processor(images=[[rgb, rgb]], return_tensors="pt")["pixel_values"][0].float()
        return self.preprocess(rgb)

    def processor_base_image(self, image: ImageInput) -> torch.Tensor:
        """The processor's own base image of ``image`` (anyres models), ``(1, 3, s, s)``: resized from the original
        picture, which ``model_inputs(x, base_images=...)`` takes to reproduce the processor path exactly."""
        if not self.anyres:
            raise ValueError(f"A {self.family} model has no base image: its input is one square image.")
        return self.processor.image_processor(images=[load_rgb(image)], return_tensors="pt")["pixel_values"][:, 0]

    def input_boxes(self, boxes, source_size: Tuple[int, int]) -> List[Tuple[int, int, int, int]]:
        """Boxes ``(x0, y0, x1, y1)`` in the pixels of a picture of ``source_size`` ``(height, width)`` to whole
        pixels of the input :meth:`preprocess` makes of it (:func:`~pytorch_grad_cam_vlm.models.anyres.input_boxes`)."""
        return input_boxes(boxes, source_size, self.canvas_size(source_size) if self.anyres else None, self.tile_size)

    def image_frame(self, image_size: Tuple[int, int], input_size: Tuple[int, int]) -> ImageFrame:
        """Where the input lies on the picture (see :meth:`ModelWrapper.image_frame`): an anyres canvas shows the
        picture resized into its content box, letterboxed; LLaVA 1.5's input is the processor's center crop (the
        rest of the picture is not seen); OneVision's picture among several is padded to a square, centered, and
        resized."""
        s = self.tile_size
        if self.family == "llava_onevision" and self.image_boxes is not None and tuple(input_size) == (s, s):
            h0, w0 = image_size
            side = max(h0, w0)
            scale = s / side
            return ImageFrame.letterboxed(image_size, input_size, ((side - h0) // 2 * scale, (side - w0) // 2 * scale,
                                                                   h0 * scale, w0 * scale))
        if self.anyres:
            return ImageFrame.letterboxed(image_size, input_size, content_box(image_size, input_size))
        return processor_frame(self.processor.image_processor, image_size, input_size)

    def canvas_size(self, source_size: Tuple[int, int]) -> Tuple[int, int]:
        """The best resolution ``(H, W)`` among the grid pinpoints for a picture of ``source_size``."""
        from transformers.image_processing_utils import select_best_resolution

        return tuple(int(v) for v in select_best_resolution(tuple(source_size), self.pinpoints))

    # ----------------------------------------------------------------------------------------- layout
    def layout_for(self, height: int, width: int) -> LlavaLayout:
        """Text inputs and token geometry for inputs of ``height x width`` pixels (and the current
        :attr:`source_size`), built once per size by the processor itself with a placeholder picture, so that
        token counts are exact. Several pictures (:attr:`image_boxes`): the layout of them all."""
        if self.image_boxes is not None:
            check_canvas(self.image_boxes, height, width)
            return self._several_layout()
        if self.anyres:
            source = self.source_size or (height, width)
            if self.canvas_size(source) != (height, width):
                raise ValueError(
                    f"A {height}x{width} input is not the canvas of a {source[0]}x{source[1]} picture (that is "
                    f"{'x'.join(map(str, self.canvas_size(source)))}; the grid pinpoints are {self.pinpoints}): "
                    "prepare images with wrapper.preprocess(image), which also sets wrapper.source_size.")
        else:
            source = (height, width)
            if source != (self.tile_size, self.tile_size):
                raise ValueError(f"A {self.family} model takes {self.tile_size}x{self.tile_size} images, got "
                                 f"{height}x{width}: prepare images with wrapper.preprocess(image).")
        key = (height, width) + tuple(source)
        if key not in self._layouts:
            layout = self._geometry((height, width), source, self.anyres)
            layout.text_inputs, positions, layout.answer_ids = self._text_inputs(np.zeros(source + (3,), np.uint8))
            layout.image_positions = positions
            if len(positions) != layout.expected_tokens:
                raise RuntimeError(f"The processor placed {len(positions)} image tokens where the wrapper expects "
                                   f"{layout.expected_tokens}: this transformers version packs {self.family} images "
                                   "differently.")
            self._layouts[key] = layout
        return self._layouts[key]

    def _several_layout(self) -> LlavaLayout:
        """The layout of several pictures in one prompt (:attr:`image_boxes`), built once per set of pictures by the
        processor with placeholders of the pictures' own sizes (:attr:`source_sizes`), so that it tiles each one as
        :meth:`preprocess` did."""
        boxes, sizes = self.image_boxes, self.source_sizes
        if (boxes, sizes) not in self._layouts:
            if len(sizes) != len(boxes):
                raise ValueError("The pictures of this canvas were not prepared together: preprocess them again "
                                 "(wrapper.preprocess([a, b])).")
            square = self.family == "llava_onevision"  # it tiles only a lone picture
            pictures = [self._geometry((height, width), size, self.anyres and not square)
                        for (_, _, height, width), size in zip(boxes.boxes, sizes)]
            placeholders = [np.zeros(tuple(size) + (3,), np.uint8) for size in sizes]
            self._layouts[(boxes, sizes)] = pictures_layout(pictures, boxes, *self._text_inputs(placeholders),
                                                            newline=square)
        return self._layouts[(boxes, sizes)]

    def _geometry(self, canvas: Tuple[int, int], source: Tuple[int, int], tiled: bool) -> LlavaLayout:
        """A picture's token geometry on its input of ``canvas`` pixels (no text yet): a square, or (``tiled``) a
        base image and tiles as the model packs them."""
        layout = LlavaLayout({}, torch.zeros(0, dtype=torch.long), self.tile_size // self.patch_size,
                             self._base_prefix(), canvas, tuple(source))
        if tiled:
            set_anyres_geometry(layout, self.model.config, self._modeling)
        return layout

    def _text_inputs(self, placeholder) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """The processor's text inputs for the prompt with ``placeholder`` (a picture, or a list of pictures for
        one prompt), its image tokens' positions and the teacher-forced answer's ids."""
        encoded = self.processor(text=[self.chat_text()], images=[placeholder], return_tensors="pt")
        return prompt_inputs(self, encoded, placeholder, ("pixel_values", "image_sizes", "batch_num_images"))

    def _base_prefix(self) -> int:
        strategy = self.model.config.vision_feature_select_strategy
        return self.class_token if strategy == "full" else 0

    # ----------------------------------------------------------------------------------------- forward
    def model_inputs(self, x: torch.Tensor,
                     base_images: Optional[Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]] = None
                     ) -> Dict[str, torch.Tensor]:
        """The model's keyword inputs for images ``x`` ``(B, 3, H, W)`` on the input device: the processor's text
        inputs of this size and ``pixel_values`` in the vision tower's dtype; for anyres models the base image
        (the canvas's picture area resized in torch, differentiable; or ``base_images`` ``(B or 1, 3, s, s)``, e.g.
        :meth:`processor_base_image`) followed by the tiles, ``image_sizes`` and OneVision's ``batch_num_images``.
        Several pictures in one prompt: each picture's images in turn (``base_images``: one per picture, ``None``
        for a square one)."""
        b, _, height, width = x.shape
        layout = self.layout_for(height, width)
        device = self.input_device
        inputs = {k: v.to(device).expand(b, -1) for k, v in layout.text_inputs.items()}
        x = x.to(device)
        if base_images is None:
            base_images = self._base_image(x, layout) if layout.boxes is None else [
                self._base_image(part, picture) for part, picture in zip(crops(x, layout.boxes), layout.pictures)]
        pictures = layout.pictures or (layout,)
        images = encode_pictures(x, layout, self._encoder_images, base_images)
        if self.anyres:
            inputs["image_sizes"] = torch.tensor([p.source_size for p in pictures] * b, device=device)
            if self.family == "llava_onevision":  # a lone picture per sample is tiled, several are not
                inputs["batch_num_images"] = torch.full((b,), len(pictures), dtype=torch.long, device=device)
        if layout.boxes is not None or not self.anyres:  # a 5-D input is one picture per row: give one image per row
            images = images.flatten(0, 1)
        inputs["pixel_values"] = images.to(next(self.vision_tower.parameters()).dtype)
        return inputs

    def _base_image(self, x: torch.Tensor, picture: LlavaLayout) -> Optional[torch.Tensor]:
        """A tiled picture's base image ``(B, 3, s, s)`` from its canvases ``x``: the picture area resized in torch
        (differentiable); ``None`` for a square picture, the encoder's image itself."""
        if not picture.anyres:
            return None
        s, (y0, x0, h, w) = self.tile_size, picture.content_box
        # the processor's resize works on uint8 pixels, so its overshoot at edges is clipped to 0..255
        return self.clip_to_pixels(F.interpolate(x[:, :, y0:y0 + h, x0:x0 + w], size=(s, s), mode="bicubic",
                                                 align_corners=False, antialias=True))

    def _encoder_images(self, x: torch.Tensor, tiles: Tuple[int, int],
                        base_image: Optional[torch.Tensor]) -> torch.Tensor:
        """One picture's inputs ``(B, 3, H, W)`` as the encoder's images ``(B, count, 3, s, s)``: the square itself
        (``tiles`` ``(0, 0)``), or the base image and the tiles."""
        if tiles == (0, 0):
            return x[:, None]
        return torch.cat([base_image.to(x).expand(len(x), -1, -1, -1)[:, None], canvas_to_tiles(x, *tiles)], dim=1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of the last position ``(B, vocab)``, or with an answer of the positions that predict
        its tokens ``(B, A, vocab)``."""
        self._check_images(x, self.token_cell)
        layout = self.layout_for(x.shape[2], x.shape[3])
        self.layout, self.batch_size = layout, x.shape[0]
        n_answer = 0 if layout.answer_ids is None else len(layout.answer_ids)
        self._warn_if_last_layer_hooked()
        deepest, unused = self.feature_blocks[-1], []
        for i in range(self.feature_blocks[-1] + 1, len(self._vision_blocks)):
            self._warn_if_hooked(self._vision_blocks[i], (
                f"Vision block {i} comes after the deepest feature layer (vision_feature_layer reads block "
                f"{deepest}), so nothing reaches the logits from it: its gradient is zero and gradient-based maps "
                f"there are blank. Use wrapper.vision_blocks[i] for i <= {deepest}."))
            if torch.is_grad_enabled() and has_forward_hooks(self._vision_blocks[i]):
                unused.append(self._vision_blocks[i])
        outputs: list = []
        handles = [block.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
                   for block in unused]
        try:
            with self._explaining(x, self._stages()) as x:
                output = self.model(**self.model_inputs(x), logits_to_keep=n_answer + 1, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        logits = output.logits.float()
        if outputs:  # their exact gradient, zero, for grad-cam's hooks on blocks that reach nothing
            logits = logits + 0 * sum(o.float().sum() for o in outputs)
        return logits[:, -1] if layout.answer_ids is None else logits[:, :-1]

    def _stages(self) -> list:
        """The model's stages in execution order, where the autograd graph may start (see ``_explaining``). Vision
        blocks after the deepest feature layer are left out: nothing reaches the logits from them, so a graph started
        there would not reach the logits; a hooked one starts the graph at the input, and ``_logits`` adds a zero
        path from its output, so that grad-cam records its (zero) gradient."""
        return self.vision_blocks[:self.feature_blocks[-1] + 1] + [self.projector] + self.decoder_layers

    # ----------------------------------------------------------------------------------------- reshape
    def reshape_transform(self, output) -> torch.Tensor:
        """Hidden states to ``(B, C, h, w)`` float32 on the token grid of the latest forward pass (``(B, 2C, h, w)``
        for an anyres model's ``"combined"`` view).

        Decoder layers ``(B, seq, C)`` (or a tuple whose first item is that) are read at the image positions;
        vision blocks and the projector ``(B x images, [class token +] patches, C)`` by rows. LLaVA 1.5 gives the
        image's patch grid; anyres models the canvas's grid of tile tokens, the view's tokens placed as
        :mod:`pytorch_grad_cam_vlm.models.anyres` says.
        """
        hidden = output[0] if isinstance(output, tuple) else output
        layout = self.layout
        if layout is None:
            raise RuntimeError("reshape_transform needs a forward pass of the wrapper first.")
        b, g, images = self.batch_size, layout.base_grid, layout.image_count
        decoder = hidden.dim() == 3 and hidden.shape[0] == b and hidden.shape[1] == layout.sequence_length
        vision = hidden.dim() == 3 and hidden.shape[0] == b * images and hidden.shape[1] in (g * g, g * g + 1)
        if not (decoder or vision):
            raise ValueError(f"Cannot map a hidden state of shape {tuple(hidden.shape)} to the image grid: expected "
                             f"({b}, {layout.sequence_length}, C) from a decoder layer or ({b * images}, {g * g} or "
                             f"{g * g + 1}, C) from a vision block or the projector.")
        if layout.pictures:
            return place_pictures(hidden.float(), layout, self.view, vision, self.patch_size)
        base, tiles = (vision_grids if vision else decoder_grids)(hidden.float(), layout)
        return place_views(base, tiles, layout, self.view)

    # ----------------------------------------------------------------------------------------- attention
    def token_geometry(self) -> Tuple[int, torch.Tensor, Tuple[int, int]]:
        """For attention maps: the query position (the last), the base image's token positions in raster order
        and their grid (LLaVA 1.5: the image's)."""
        return -1, self.layout.base_positions, (self.layout.base_grid, self.layout.base_grid)

    # ----------------------------------------------------------------------------------------- ablation
    @property
    def view_positions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The tiles' token positions and the base image's (LLaVA 1.5: the image's for both)."""
        layout = self.layout
        return (layout.tile_positions if layout.anyres else layout.base_positions), layout.base_positions

