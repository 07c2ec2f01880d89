"""GLM-4V adapter (GLM-4.1V, ``glm4v``; GLM-4.5V, ``glm4v_moe``, whose vision encoder and processor are the same and
whose decoder mixes experts; GLM-4.6V, ``glm46v``, the same encoder and processor under their own class names):
:class:`QwenVLWrapper`'s contract on GLM's vision encoder, read from transformers' ``models/glm4v``,
``models/glm4v_moe`` and ``models/glm46v``.

What is Qwen's, and handled by :class:`QwenVLWrapper` unchanged:

- **Image processor** (``Glm4vImageProcessor``): a ``smart_resize`` to multiples of ``patch x merge`` (28 px) within a
  pixel budget (counted over the 2 frames an image is repeated over), CLIP mean/std, and ``pixel_values`` laid out by
  the same ``patchify`` as Qwen2-VL's: 14-px patches in 2x2 merge-block order, each repeated over 2 frames;
  ``image_grid_thw`` holds ``(t, h, w)`` in patches.
- **Text side**: ``<|begin_of_image|>``, one ``<|image|>`` per merged cell in raster order, ``<|end_of_image|>``;
  the processor returns ``mm_token_type_ids`` and the model builds 3-D (t, h, w) rotary positions from it, so the
  wrapper passes the processor's text inputs whole.
- **Vision encoder** (``Glm4vVisionModel``): blocks hold ``(patches of the batch, C)`` in merge-block order, with
  full attention within each image (no windows); a learned position table is interpolated (bicubic) to each grid.

What differs: after the blocks, an RMSNorm and a strided 2x2 convolution (``visual.downsample``) merge the patches,
then ``visual.merger`` (a gated MLP) projects them: the merger's output, one row per 28-pixel cell in raster order,
is what the decoder receives (:attr:`Glm4vWrapper.projector`). GLM's image tokens are ``<|image|>`` and
``<|begin_of_image|>``, so the prompt check names those.
"""
from __future__ import annotations

import torch

from pytorch_grad_cam_vlm.models.qwen_vl import QwenVLWrapper, check_prompt

IMAGE_TOKENS = ("<|image|>", "<|begin_of_image|>", "<|end_of_image|>")
FAMILIES = ("glm4v", "glm4v_moe", "glm46v")


class Glm4vWrapper(QwenVLWrapper):
    """GLM-4V (GLM-4.1V), GLM-4V-MoE (GLM-4.5V) and GLM-4.6V as an image classifier over the vocabulary, for
    grad-cam.

    The contract of :class:`QwenVLWrapper`: ``forward(x)`` takes normalised images ``(B, 3, H, W)`` (multiples of 28
    pixels, as :meth:`preprocess` makes them with the processor's own ``smart_resize``) and returns the next-token
    logits ``(B, vocab)`` float32 after the chat-formatted ``prompt``, or an answer's score ``(B, 1)`` with
    ``answer=``. :meth:`reshape_transform` maps decoder layers (the ``<|image|>`` positions), vision blocks (the
    14-pixel patch grid) and the merger (the 28-pixel token grid) onto the image. GLM-4.5V's chat template opens a
    thinking block; ``chat_template_kwargs={"enable_thinking": False}`` explains a direct answer instead.
    """

    supports_video = False  # GLM's video processor frames and times its pairs its own way; not reproduced here

    def __init__(self, model: torch.nn.Module, processor, prompt: str, **kwargs) -> None:
        if getattr(model.config, "model_type", None) not in FAMILIES:
            raise ValueError(f"Glm4vWrapper supports model types {FAMILIES}, got {model.config.model_type!r}.")
        check_prompt(prompt, IMAGE_TOKENS)
        super().__init__(model, processor, prompt, **kwargs)
