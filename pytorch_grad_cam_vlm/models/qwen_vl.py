"""Qwen2.5-VL and Qwen2-VL adapter: a ``torch.nn.Module`` that maps normalised images to next-token logits, so that
every grad-cam method, target and metric runs on it unchanged."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from pytorch_grad_cam_vlm.image import DEFAULT_FPS, ImageInput, load_rgb
from pytorch_grad_cam_vlm.models.ablation import TokenAblationLayer
from pytorch_grad_cam_vlm.models.answer_text import check_answer, prompt_inputs, word_token_id
from pytorch_grad_cam_vlm.models.base import DecoderLayers, ModelWrapper, check_size, find_module_list
from pytorch_grad_cam_vlm.models.multi_image import (ImageBoxes, check_canvas, preprocess_several, qwen_pixel_values,
                                                     qwen_reshape)
from pytorch_grad_cam_vlm.models.qwen_patches import patchify, unpatchify, vision_window_index
from pytorch_grad_cam_vlm.models.video import (VideoClip, check_video_canvas, prepare_video, qwen_video_pixel_values,
                                               qwen_video_reshape, video_media)


AnswerInput = Union[str, Sequence[int]]


@dataclass
class Layout:
    """Where the image sits in one prompt: the processor's text inputs for one image and its vision grid."""

    text_inputs: Dict[str, torch.Tensor]  # input_ids, attention_mask, ... for batch 1, without pixel_values
    grid_thw: torch.Tensor  # (1, 3): t, h, w in patches
    vision_positions: torch.Tensor  # sequence positions of the image tokens, in raster order of the merged grid
    answer_ids: Optional[torch.Tensor] = None  # the teacher-forced answer's token ids, the last tokens of input_ids
    boxes: Optional[ImageBoxes] = None  # several images on one canvas (grid_thw has a row per image)
    video: Optional[VideoClip] = None  # a video's frames on one canvas (grid_thw: its frame pairs, h, w)
    timing: Dict[str, torch.Tensor] = field(default_factory=dict)  # one value per video: second_per_grid_ts

    @property
    def patch_grid(self) -> Tuple[int, int]:
        return int(self.grid_thw[0, 1]), int(self.grid_thw[0, 2])


def check_prompt(prompt, image_tokens: Sequence[str]) -> None:
    """Refuse a prompt that is not a question or that places images itself (the chat template inserts the image)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be the question to explain, a non-empty string; got {prompt!r}.")
    if any(token in prompt for token in image_tokens):
        raise ValueError("Pass the question alone as `prompt`: the wrapper inserts the image with the "
                         "processor's chat template.")


def warn_control_tokens(prompt: str, tokenizer) -> None:
    """Warn when the prompt holds the tokenizer's control tokens (``<|im_end|>``, ``<|im_start|>``, ...): the chat
    template already wraps the question, and such tokens end or open turns inside it."""
    special = set(tokenizer.all_special_tokens) | {
        token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special}
    found = sorted(token for token in special if token and token in prompt)
    if found:
        warnings.warn(f"The prompt contains the chat template's control tokens {found}: the wrapper already puts the "
                      "question inside the chat template, so these end or open turns inside it and change what is "
                      "explained. Pass the question alone.", stacklevel=4)


class QwenVLWrapper(DecoderLayers, ModelWrapper):
    """Qwen2.5-VL / Qwen2-VL as an image classifier over the vocabulary, for grad-cam.

    ``forward(x)`` takes normalised images ``(B, 3, H, W)`` (all of one size, a multiple of 28 pixels, as
    :meth:`preprocess` makes them) and returns the logits of the next token after the chat-formatted ``prompt``,
    ``(B, vocab)`` float32. The prompt's tokens are built by the model's own processor and chat template once per
    image size. :meth:`reshape_transform` turns the hidden states of decoder layers, vision blocks and the patch
    merger into ``(B, C, h, w)`` maps on the image's true grid.

    While a forward pass runs, the model is in eval mode with frozen parameters, and no autograd graph is built
    before the shallowest hooked layer (``efficient_gradients=False`` turns both off); afterwards its modes,
    ``requires_grad`` flags and hooks are as they were.

    With an ``answer`` (text, or token ids as ``model.generate`` returns them), the answer's tokens are teacher-forced
    after the generation prompt and ``forward`` returns the answer's score ``(B, 1)``: the sum (or, with
    ``answer_reduction="mean"``, the mean) of the answer tokens' log-probabilities. Every grad-cam method, target
    ``None`` and the ROAD metrics then explain the whole answer; :meth:`answer_logits` keeps the logits at hand.

    ``chat_template_kwargs`` go to the chat template (e.g. ``{"enable_thinking": False}`` for Qwen3.5).
    """

    ablation_layer_type = TokenAblationLayer
    canvas_kwargs = {"do_resize": False}  # processor options for a placeholder of an input already resized
    supports_video = True  # whether preprocess_video works: the Qwen families' own video processors
    several_images = True  # preprocess takes a list of images for one prompt (models.multi_image)

    def __init__(self, model: torch.nn.Module, processor, prompt: str, efficient_gradients: bool = True,
                 answer: Optional[AnswerInput] = None, answer_reduction: str = "sum",
                 chat_template_kwargs: Optional[Dict[str, object]] = None) -> None:
        check_prompt(prompt, ("<|image_pad|>", "<|vision_start|>"))
        super().__init__(model, processor, efficient_gradients)
        image_processor = processor.image_processor
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self._text_model, self._decoder_layers = find_module_list(model, "embed_tokens")
        self.visual, self._vision_blocks = find_module_list(model, "merger")
        self._watch_layers(self._decoder_layers, self._vision_blocks, self.visual)
        self._init_prompt_side(prompt, chat_template_kwargs, answer, answer_reduction)

    # ----------------------------------------------------------------------------------------- layers
    @property
    def vision_blocks(self) -> List[torch.nn.Module]:
        """The vision encoder's transformer blocks (window-ordered outputs, undone by :meth:`reshape_transform`)."""
        return list(self._vision_blocks)

    @property
    def merger(self) -> torch.nn.Module:
        """The patch merger: one vector per 28-pixel cell, in the order the language model receives them."""
        return self.visual.merger

    @property
    def projector(self) -> torch.nn.Module:
        """What turns the vision encoder's output into the decoder's image tokens: the :attr:`merger`."""
        return self.merger

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: accelerate's main device for a dispatched model, else the embeddings' device."""
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map:
            on_accelerators = [d for d in device_map.values() if d not in ("cpu", "disk", "meta")]
            if not on_accelerators:
                return torch.device("cpu")
            first = on_accelerators[0]
            return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
        return self._text_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._text_model.embed_tokens.weight.dtype

    # ----------------------------------------------------------------------------------------- images
    def preprocess(self, image: Union[ImageInput, Sequence[ImageInput]]) -> torch.Tensor:
        """The processor's own resize (``smart_resize`` within its min/max pixels) and normalisation, as
        ``(1, 3, H, W)`` float32 on the CPU. Accepts a path, a PIL image or a uint8 array; any mode is made RGB.
        A list of images asks them all in one prompt: each is resized on its own and they lie side by side on one
        canvas (:mod:`~pytorch_grad_cam_vlm.models.multi_image`), which :attr:`image_boxes` remembers until the
        next call."""
        if isinstance(image, (list, tuple)):
            return preprocess_several(self, image, self.preprocess)
        self.image_boxes = self.video = None
        encoded = self.processor.image_processor(images=[load_rgb(image)], return_tensors="pt")
        grid = encoded["image_grid_thw"][0]
        return unpatchify(encoded["pixel_values"].float(), (int(grid[1]), int(grid[2])), self.patch_size,
                          self.merge_size, self.temporal_patch_size)

    def preprocess_video(self, frames, fps: float = DEFAULT_FPS, frame_indices: Optional[Sequence[int]] = None,
                         total_frames: Optional[int] = None) -> torch.Tensor:
        """A video asked in the prompt: its frames (a list of paths, PIL images or uint8 arrays of one size, or a
        ``(T, H, W, 3)`` uint8 array; at least 2) resized and normalised by the model's own video processor, in a
        row on one canvas ``(1, 3, H, W)`` float32 (:mod:`~pytorch_grad_cam_vlm.models.video`), which :attr:`video`
        remembers until the next ``preprocess``. Every frame given is explained (no sampling); an odd last frame is
        repeated to fill its temporal patch, as the processor does. ``fps`` (the rate the frames were taken at),
        ``frame_indices`` and ``total_frames`` (where they lie in a longer source; default ``0..T-1`` of ``T``) give
        the model the frames' times, as transformers' video metadata does."""
        if not self.supports_video:
            raise ValueError(f"{type(self).__name__} does not take video here; videos work with Qwen2-VL, "
                             "Qwen2.5-VL, Qwen3-VL and Qwen3.5 models. Explain the frames one at a time as images.")
        x, video = prepare_video(self, frames, fps, frame_indices, total_frames)
        self.image_boxes, self.video = None, video
        return x

    # ----------------------------------------------------------------------------------------- text
    def chat_text(self) -> str:
        """The prompt as the model sees it: the chat template around the image (or images, or video) and the
        question, followed by the answer when one is set as text."""
        images = [{"type": "image"}] * len(getattr(self, "image_boxes", None) or [None])
        images = [{"type": "video"}] if getattr(self, "video", None) is not None else images
        messages = [{"role": "user", "content": images + [{"type": "text", "text": self.prompt}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, **self.chat_template_kwargs)
        return prompt + self.answer if isinstance(self.answer, str) else prompt

    # ----------------------------------------------------------------------------------------- answers
    def _init_prompt_side(self, prompt: str, chat_template_kwargs: Optional[Dict[str, object]],
                          answer: Optional[AnswerInput], answer_reduction: str) -> None:
        """The prompt side's state: the prompt, the chat template's options, no layout cached yet (one per input
        size, and the latest forward pass's, read by ``reshape_transform``) and the teacher-forced answer."""
        warn_control_tokens(prompt, self.processor.tokenizer)
        self.prompt = prompt
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._layouts: Dict[tuple, object] = {}
        self.layout = None
        self.image_boxes: Optional[ImageBoxes] = None  # several images on one canvas, set by preprocess
        self.video: Optional[VideoClip] = None  # a video's frames on one canvas, set by preprocess_video
        self.set_answer(answer, answer_reduction)

    def set_answer(self, answer: Optional[AnswerInput], reduction: str = "sum") -> None:
        """Teacher-force ``answer`` (text, tokenised as the processor tokenises the whole chat, or token ids) after
        the generation prompt, so that ``forward`` returns its score ``(B, 1)``: the ``"sum"`` or ``"mean"`` of its
        tokens' log-probabilities. ``None`` goes back to next-token logits."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"answer_reduction must be 'sum' or 'mean', got {reduction!r}.")
        self.answer = None if answer is None else check_answer(answer, self.processor)
        self.answer_reduction = reduction
        self._layouts.clear()

    def token_id(self, word: str) -> int:
        """The id of the one token the tokenizer makes of ``word``, taken as written: Qwen's tokenizer gives
        ``"red"`` (as the first word of an answer) and ``" red"`` (after a space) different ids. A word that becomes
        several tokens raises ``ValueError``: explain it with ``set_answer(word)`` instead."""
        return word_token_id(self.processor.tokenizer, word)

    def answer_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, A, vocab)`` float32 logits under teacher forcing: ``[:, t]`` predicts answer token ``t``."""
        if self.answer is None:
            raise ValueError("No answer is set: create the wrapper with answer=... or call wrapper.set_answer(...).")
        return self._logits(x)

    def answer_token_scores(self, x: torch.Tensor, score: str = "log_prob") -> torch.Tensor:
        """``(B, A)`` float32: each answer token's ``"log_prob"`` or ``"logit"`` under teacher forcing."""
        if score not in ("log_prob", "logit"):
            raise ValueError(f"score must be 'log_prob' or 'logit', got {score!r}.")
        logits = self.answer_logits(x)
        if score == "log_prob":
            logits = torch.log_softmax(logits, dim=-1)
        ids = self.layout.answer_ids.to(logits.device).expand(logits.shape[0], -1)
        return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    def layout_for(self, height: int, width: int) -> Layout:
        """Text inputs and vision grid for images of ``height x width`` pixels (multiples of :attr:`token_cell`),
        built once per size by the processor itself with a placeholder image, so that token counts and
        ``mm_token_type_ids`` are exact. The placeholder is taken as it is (``do_resize=False``): the input was
        resized once already, by :meth:`preprocess`, and ``smart_resize`` is not idempotent (with ``min_pixels ==
        max_pixels`` it makes 84x112 of a 480x640 photo, then 112x140 of that). A video's layout comes from a
        placeholder video of its frames' size and count with its timing (:meth:`preprocess_video`)."""
        boxes, video = self.image_boxes, self.video
        if video is not None:
            check_video_canvas(video, height, width)
        elif boxes is not None:
            check_canvas(boxes, height, width)
        key = (height, width, boxes, video)
        if key not in self._layouts:
            check_size(height, width, self.token_cell)
            if video is not None:
                media, token, grid_key = video_media(video), self.processor.video_token, "video_grid_thw"
            else:
                placeholder = [np.zeros((h, w, 3), dtype=np.uint8) for _, _, h, w in boxes.boxes] if boxes \
                    else np.zeros((height, width, 3), dtype=np.uint8)
                media, token, grid_key = {"images": [placeholder]}, self.processor.image_token, "image_grid_thw"
            encoded = self.processor(text=[self.chat_text()], return_tensors="pt", **media, **self.canvas_kwargs)
            grid = encoded[grid_key]
            token_id = self.processor.tokenizer.convert_tokens_to_ids(token)
            timing = {k: encoded[k] for k in ("second_per_grid_ts",) if k in encoded}
            text_inputs, positions, answer_ids = prompt_inputs(
                self, encoded, None, ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                      *timing), token_id, **media, **self.canvas_kwargs)
            self._layouts[key] = Layout(text_inputs, grid, positions, answer_ids, boxes, video, timing)
        return self._layouts[key]

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, vocab)``, or with an answer set its score ``(B, 1)``."""
        if self.answer is None:
            return self._logits(x)
        scores = self.answer_token_scores(x)
        return scores.sum(-1, keepdim=True) if self.answer_reduction == "sum" else scores.mean(-1, keepdim=True)

    @property
    def token_cell(self) -> int:
        """The pixels one image token covers, a merge block of patches: 28 for Qwen2-VL and Qwen2.5-VL (2x2 patches
        of 14), 32 for Qwen3-VL and Qwen3.5 (2x2 patches of 16)."""
        return self.patch_size * self.merge_size

    def model_inputs(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The model's keyword inputs for images ``x`` ``(B, 3, H, W)`` on the input device: the processor's text
        inputs of this image size, ``pixel_values`` patchified in torch (differentiable) in the vision encoder's
        dtype, and ``image_grid_thw``."""
        b, _, height, width = x.shape
        layout = self.layout_for(height, width)
        device = self.input_device
        inputs = {k: v.to(device).expand(b, -1) for k, v in layout.text_inputs.items()}
        dtype = next(self.visual.parameters()).dtype
        if layout.video is not None:  # one video per sample
            inputs["pixel_values_videos"] = qwen_video_pixel_values(self, x.to(device), layout.video).to(dtype)
            inputs["video_grid_thw"] = layout.grid_thw.repeat(b, 1).to(device)
            inputs.update({k: v.repeat(b).to(device) for k, v in layout.timing.items()})
            return inputs
        pixel_values = qwen_pixel_values(self, x.to(device), layout.boxes) if layout.boxes else \
            patchify(x.to(device), self.patch_size, self.merge_size, self.temporal_patch_size)
        inputs["pixel_values"] = pixel_values.to(dtype)
        inputs["image_grid_thw"] = layout.grid_thw.repeat(b, 1).to(device)
        return inputs

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of the last position ``(B, vocab)``, or with an answer of the positions that predict
        its tokens ``(B, A, vocab)`` (teacher forcing: token ``t`` is predicted at position ``t - 1``)."""
        self._check_images(x, self.token_cell)
        layout = self.layout_for(x.shape[2], x.shape[3])
        self.layout, self.batch_size = layout, x.shape[0]
        n_answer = 0 if layout.answer_ids is None else len(layout.answer_ids)
        self._warn_if_last_layer_hooked()
        with self._explaining(x, self._stages()) as x:
            output = self.model(**self.model_inputs(x), logits_to_keep=n_answer + 1, use_cache=False)
        logits = output.logits.float()
        return logits[:, -1] if layout.answer_ids is None else logits[:, :-1]

    # ----------------------------------------------------------------------------------------- reshape
    def reshape_transform(self, output) -> torch.Tensor:
        """Hidden states to ``(B, C, h, w)`` float32 on the true grid of the latest forward pass.

        Decoder layers ``(B, seq, C)`` (or a tuple whose first item is that, as older transformers return) give the
        ``h/2 x w/2`` grid of image tokens; vision blocks ``(B*h*w, C)`` give the ``h x w`` grid of patches (14 pixels,
        16 for Qwen3-VL and Qwen3.5), with the window order (Qwen2.5-VL) and 2x2 merge order undone; the merger (and
        Qwen3-VL's DeepStack mergers) ``(B*h*w/4, C)`` give the grid of image tokens.
        """
        hidden = output[0] if isinstance(output, tuple) else output
        if self.layout is None:
            raise RuntimeError("reshape_transform needs a forward pass of the wrapper first.")
        if self.layout.video is not None:
            return qwen_video_reshape(self, hidden)
        if self.layout.boxes is not None:
            return qwen_reshape(self, hidden)
        b, (gh, gw), m = self.batch_size, self.layout.patch_grid, self.merge_size
        if hidden.dim() == 3:
            tokens = hidden[:, self.layout.vision_positions.to(hidden.device)]
            return tokens.reshape(b, gh // m, gw // m, -1).permute(0, 3, 1, 2).float()
        if hidden.dim() != 2:
            raise ValueError(f"Cannot map a hidden state of shape {tuple(hidden.shape)} to the image grid.")
        order = torch.argsort(vision_window_index(self.visual, self.layout.grid_thw.repeat(b, 1))).to(hidden.device)
        if hidden.shape[0] == b * gh * gw:  # vision block: 14-pixel patches, grouped by merge block and window
            blocks = hidden.reshape(-1, m * m, hidden.shape[-1])[order]
            grid = blocks.reshape(b, gh // m, gw // m, m, m, -1).permute(0, 5, 1, 3, 2, 4)
            return grid.reshape(b, -1, gh, gw).float()
        if hidden.shape[0] == b * gh * gw // (m * m):  # merger: one row per merge block, in window order
            return hidden[order].reshape(b, gh // m, gw // m, -1).permute(0, 3, 1, 2).float()
        raise ValueError(f"A vision hidden state of {hidden.shape[0]} rows fits neither the {b * gh * gw} patches "
                         f"nor the {b * gh * gw // (m * m)} merged cells of the latest forward pass.")

    def image_row_to_grid(self, row: torch.Tensor) -> torch.Tensor:
        """A value per sequence position ``(B, S)`` (an attention row) on the grid of image tokens ``(B, 1, h, w)``,
        placed as decoder maps are: on each image's box, or each frame pair's frames, of a canvas."""
        return self.reshape_transform(row.unsqueeze(-1))


class QwenPromptSide:
    """:class:`QwenVLWrapper`'s prompt and answer side (the chat template around one image, the next-token logits,
    teacher-forced answers), for the families that keep it unchanged: put it first among their base classes. A family
    that builds its model inputs differently defines its own ``_logits`` or ``chat_text``."""

    forward = QwenVLWrapper.forward
    _logits = QwenVLWrapper._logits
    chat_text = QwenVLWrapper.chat_text
    _init_prompt_side = QwenVLWrapper._init_prompt_side
    set_answer = QwenVLWrapper.set_answer
    token_id = QwenVLWrapper.token_id
    answer_logits = QwenVLWrapper.answer_logits
    answer_token_scores = QwenVLWrapper.answer_token_scores
    input_device = QwenVLWrapper.input_device
    dtype = QwenVLWrapper.dtype
