"""Offline builders for tiny GLM-4V (GLM-4.1V), GLM-4V-MoE (GLM-4.5V) and GLM-4.6V models with their real processors.

As :mod:`pytorch_grad_cam_vlm.models.tiny.qwen_vl` does for Qwen2.5-VL: a small config, GLM-4V's real processor
(``Glm4vProcessor``), image processor (``Glm4vImageProcessor``: GLM's ``smart_resize`` to multiples of 28 within its
pixel budget, CLIP mean/std, patches of 14 in 2x2 merge-block order, each repeated over 2 frames) and video processor
(``Glm4vVideoProcessor``), a byte-level BPE tokenizer over a small word list with GLM's special tokens
(``[gMASK]``, ``<sop>``, ``<|user|>``, ``<|begin_of_image|>``, ``<|image|>``, ...) and the structure of the released
chat template (zai-org/GLM-4.1V-9B-Thinking: ``[gMASK]<sop><|user|>\\n<|begin_of_image|><|image|><|end_of_image|>
question<|assistant|>\\n``, GLM-4.5V's ``enable_thinking=False`` adds an empty thinking block), saved with
``save_pretrained`` and loaded back with ``from_pretrained``. Nothing is downloaded. GLM-4.6V's classes
(``Glm46VProcessor``, ``Glm46VImageProcessor``, ``Glm46VVideoProcessor``) do the same under their own names.

The vision encoder keeps the released geometry (14-pixel patches, 2x2 merge by a strided convolution, one token per
28-pixel cell) at a small width, with a learned position table of 4x4 entries interpolated (bicubic) to each grid;
the decoder rotates half of each head with 3-D (t, h, w) rotary positions, as released.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import torch

from pytorch_grad_cam_vlm.models.tiny.qwen_vl import DEFAULT_WORDS, build_bpe_tokenizer, mrope_section, save_and_reload

GLM4V_SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                        "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                        "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>")

# The released template's structure (GLM-4.1V-9B-Thinking, GLM-4.5V), less tools and the assistant's reasoning.
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n"
    "{%- if msg.content is string %}{{ msg.content }}{%- else %}{{ msg.content[0].text }}{%- endif %}"
    "{%- elif msg.role == 'user' %}<|user|>{{ '\\n' }}{%- if msg.content is string %}{{ msg.content }}{%- else %}"
    "{%- for item in msg.content %}{%- if item.type == 'video' or 'video' in item %}"
    "<|begin_of_video|><|video|><|end_of_video|>{%- elif item.type == 'image' or 'image' in item %}"
    "<|begin_of_image|><|image|><|end_of_image|>{%- elif item.type == 'text' %}{{ item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{%- elif msg.role == 'assistant' %}<|assistant|>{{ '\\n' }}"
    "{%- if msg.content is string %}{{ msg.content }}{%- else %}{{ msg.content[0].text }}{%- endif %}"
    "{%- endif %}{%- endfor %}{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}<think></think>{{ '\\n' }}{%- endif %}{% endif %}"
)

PATCH = 14  # as released: one token per 28-pixel cell
MIN_PIXELS = 2 * 56 * 56  # GLM's smart_resize counts the 2 frames an image is repeated over
MAX_PIXELS = 2 * 28 * 28 * 48


def build_glm4v_processor(words: Iterable[str] = DEFAULT_WORDS, min_pixels: int = MIN_PIXELS,
                          max_pixels: int = MAX_PIXELS, family: str = "glm4v"):
    """GLM-4V's real processor around its real image and video processors (patch 14, merge 2, temporal patch 2,
    CLIP mean/std, a pixel budget of ``min_pixels..max_pixels`` counted over 2 frames) and a byte-level BPE tokenizer
    with GLM's special tokens and chat template; GLM-4.6V's classes (``Glm46VProcessor``, ...) for ``"glm46v"``."""
    import transformers

    prefix = "Glm46V" if _check(family) == "glm46v" else "Glm4v"

    tokenizer = build_bpe_tokenizer(transformers.Qwen2Tokenizer, words, special_tokens=GLM4V_SPECIAL_TOKENS,
                                    chat_template=GLM4V_CHAT_TEMPLATE, eos_token="<|user|>",
                                    pad_token="<|endoftext|>")
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(
        size=size, patch_size=PATCH, temporal_patch_size=2, merge_size=2)
    video_processor = getattr(transformers, f"{prefix}VideoProcessor")(patch_size=PATCH, temporal_patch_size=2,
                                                                       merge_size=2)
    return getattr(transformers, f"{prefix}Processor")(image_processor=image_processor, tokenizer=tokenizer,
                                                       video_processor=video_processor,
                                                       chat_template=GLM4V_CHAT_TEMPLATE)


GLM4V_FAMILIES = ("glm4v", "glm4v_moe", "glm46v")


def tiny_glm4v_config(tokenizer, family: str = "glm4v", text_layers: int = 4, text_width: int = 64,
                      vision_blocks: int = 2, vision_width: int = 32, heads: int = 4, vision_heads: int = 2):
    """A small config of ``family``: a vision encoder of ``vision_blocks`` blocks (14-px patches, a 4x4 learned
    position table, 2x2 merge) and a GLM-4 decoder of ``text_layers`` layers with partial 3-D rotary positions;
    ``"glm4v_moe"`` (GLM-4.5V) makes every layer after the first a mixture of 4 experts (2 per token, one shared);
    ``"glm46v"`` (GLM-4.6V-Flash) is GLM-4.1V's encoder and decoder under GLM-4.6V's config."""
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    head_dim = text_width // heads
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "mrope_section": mrope_section(head_dim // 2)}
    text = dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=4096, rope_parameters=rope, pad_token_id=ids("<|endoftext|>"))
    vision = dict(depth=vision_blocks, hidden_size=vision_width, intermediate_size=2 * vision_width,
                  num_heads=vision_heads, patch_size=PATCH, image_size=4 * PATCH, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text_width,
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    if family == "glm4v_moe":
        text.update(moe_intermediate_size=text_width, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                    first_k_dense_replace=1)
    if family == "glm46v":  # sub-configs chosen by model_type
        text, vision = dict(text, model_type="glm4v_text"), dict(vision, model_type="glm4v_vision")
    config_cls = {"glm4v": transformers.Glm4vConfig, "glm4v_moe": transformers.Glm4vMoeConfig,
                  "glm46v": transformers.Glm46VConfig}[_check(family)]
    return config_cls(
        text_config=text, vision_config=vision, image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"), image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"), video_end_token_id=ids("<|end_of_video|>"))


def build_tiny_glm4v(path: Optional[str | os.PathLike] = None, family: str = "glm4v", seed: int = 0,
                     words: Iterable[str] = DEFAULT_WORDS, dtype: torch.dtype = torch.float32, **config_kwargs
                     ) -> Tuple[torch.nn.Module, object]:
    """Build a tiny random GLM-4V (``family="glm4v"``, ``Glm4vForConditionalGeneration``), GLM-4.5V
    (``"glm4v_moe"``, ``Glm4vMoeForConditionalGeneration``; ``Glm4vProcessor`` for both, as released) or GLM-4.6V
    (``"glm46v"``, ``Glm46VForConditionalGeneration`` and ``Glm46VProcessor``) and its processor, save both to
    ``path`` with ``save_pretrained`` and load them back with ``from_pretrained``. Returns ``(model, processor)``."""
    import transformers

    processor = build_glm4v_processor(words, family=family)
    config = tiny_glm4v_config(processor.tokenizer, family=family, **config_kwargs)
    torch.manual_seed(seed)
    model_cls = {"glm4v": transformers.Glm4vForConditionalGeneration,
                 "glm4v_moe": transformers.Glm4vMoeForConditionalGeneration,
                 "glm46v": transformers.Glm46VForConditionalGeneration}[family]
    model = model_cls(config)
    # transformers' std of 0.02 makes the merger's image embeddings ~20x smaller than the text embeddings (norms
    # 0.007 and 0.16), so decoder maps of a random model follow the text; a trained merger's are not so small
    with torch.no_grad():
        for linear in (model.model.visual.merger.gate_proj, model.model.visual.merger.up_proj,
                       model.model.visual.merger.down_proj):
            linear.weight.normal_(std=linear.weight.shape[1] ** -0.5)
    return save_and_reload(model, processor, path, model_cls, dtype, prefix=f"tiny_{family}_")


def _check(family: str) -> str:
    if family not in GLM4V_FAMILIES:
        raise ValueError(f"Unknown family {family!r}: use one of {', '.join(GLM4V_FAMILIES)}.")
    return family
