"""Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 adapter: :class:`QwenVLWrapper`'s contract on the Qwen3 vision encoder.

What the Qwen3 families change, and where it is handled:

- 16-pixel patches (one token per 32-pixel cell) and mean/std 0.5: read from the image processor, as for Qwen2.5-VL.
- No attention windows: vision blocks hold patches in 2x2 merge-block order only (the window order is the identity).
- DeepStack (Qwen3-VL): the outputs of the blocks in ``deepstack_visual_indexes`` also reach the decoder through
  ``deepstack_merger_list``, added to the image positions of the first decoder layers. The autograd graph must
  then start at such a block's input whenever its DeepStack merger is watched, so that both paths are in it.
- Qwen3.5 mixes linear-attention (Gated DeltaNet) decoder layers with full-attention ones; only the latter have
  attention weights to read (:attr:`full_attention_layers`).
"""
from __future__ import annotations

from typing import List

import torch

from pytorch_grad_cam_vlm.models.qwen_vl import QwenVLWrapper


class Qwen3VLWrapper(QwenVLWrapper):
    """Qwen3-VL (and Qwen3-VL-MoE) / Qwen3.5 as an image classifier over the vocabulary, for grad-cam.

    The contract of :class:`QwenVLWrapper`: ``forward(x)`` takes normalised images ``(B, 3, H, W)`` (multiples of
    32 pixels, as :meth:`preprocess` makes them with the processor's ``smart_resize``) and returns the next-token
    logits ``(B, vocab)`` float32 after the chat-formatted ``prompt``, or an answer's score ``(B, 1)`` with
    ``answer=``. :meth:`reshape_transform` maps decoder layers, vision blocks, the merger and the DeepStack mergers
    onto the image's true grid. Qwen3.5's chat template opens a thinking block after the generation prompt; pass
    ``chat_template_kwargs={"enable_thinking": False}`` to explain a direct answer instead.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deepstack = getattr(self.visual, "deepstack_merger_list", None) or torch.nn.ModuleList()
        self._deepstack_indexes = [int(i) for i in getattr(self.visual, "deepstack_visual_indexes", [])]
        self._watch_children(self._deepstack)

    @property
    def vision_blocks(self) -> List[torch.nn.Module]:
        """The vision encoder's transformer blocks: outputs ``(patches of the batch, C)`` in 2x2 merge-block order
        (no attention windows), one row per 16-pixel patch."""
        return list(self._vision_blocks)

    @property
    def merger(self) -> torch.nn.Module:
        """The patch merger: one vector per 32-pixel cell, in the order the language model receives them."""
        return self.visual.merger

    @property
    def deepstack_visual_indexes(self) -> List[int]:
        """The vision blocks whose outputs DeepStack feeds to the first decoder layers (none for Qwen3.5)."""
        return list(self._deepstack_indexes)

    @property
    def deepstack_mergers(self) -> List[torch.nn.Module]:
        """The DeepStack mergers: ``deepstack_mergers[k]`` merges block ``deepstack_visual_indexes[k]`` into one
        vector per 32-pixel cell, added to the image positions after decoder layer ``k``."""
        return list(self._deepstack)

    def _stages(self) -> list:
        """Vision blocks (each with the DeepStack merger that reads it), the merger and the decoder layers: a watched
        DeepStack merger starts the graph at its block's input, so the block's output is in the graph for both the
        DeepStack path and the blocks after it."""
        stages = []
        for i, block in enumerate(self._vision_blocks):
            if i in self._deepstack_indexes:
                stages.append((block, self._deepstack[self._deepstack_indexes.index(i)]))
            else:
                stages.append(block)
        return stages + [self.merger] + self.decoder_layers
