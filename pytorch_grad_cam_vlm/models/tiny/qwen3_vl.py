"""Offline builders for tiny Qwen3-VL and Qwen3.5 models (and their MoE variants) with their real processors.

As :mod:`pytorch_grad_cam_vlm.models.tiny.qwen_vl` does for Qwen2.5-VL: a small config, the family's real processor
(``Qwen3VLProcessor``), image processor (``Qwen2VLImageProcessor`` with Qwen3-VL's 16-pixel patches and mean/std 0.5),
video processor (``Qwen3VLVideoProcessor``) and tokenizer class (``Qwen2Tokenizer`` for Qwen3-VL, ``Qwen3_5Tokenizer``
for Qwen3.5: byte-level BPE over a small word list) with Qwen's special tokens and the family's chat template, saved
with ``save_pretrained`` and loaded back with ``from_pretrained``. Nothing is downloaded.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Tuple

import torch

from pytorch_grad_cam_vlm.models.tiny.qwen_vl import (DEFAULT_WORDS, QWEN_SPECIAL_TOKENS, build_bpe_tokenizer,
                                                      mrope_section, save_and_reload)

QWEN3_FAMILIES = ("qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe")
QWEN3_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + ("<think>", "</think>")

# The structure of the released templates (Qwen3-VL-*-Instruct and Qwen3.5), less tools: no default system
# prompt, vision placeholders rendered by one macro, and the family's generation prompt. Qwen3.5 trims each message
# and opens a thinking block after the generation prompt (an empty one with enable_thinking=False).
_RENDER_CONTENT = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- macro render_content(content) %}{%- if content is string %}{{- content }}"
    "{%- elif content is iterable and content is not mapping %}{%- for item in content %}"
    "{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'video' in item or item.type == 'video' %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}"
)
QWEN3_VL_CHAT_TEMPLATE = _RENDER_CONTENT + (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3_5_CHAT_TEMPLATE = _RENDER_CONTENT + (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content)|trim + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"
)


def _family(family: str):
    """``(model class, config class, tokenizer class, chat template)`` of a Qwen3 family."""
    import transformers

    classes = {
        "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", "Qwen2Tokenizer", QWEN3_VL_CHAT_TEMPLATE),
        "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig", "Qwen2Tokenizer",
                         QWEN3_VL_CHAT_TEMPLATE),
        "qwen3_5": ("Qwen3_5ForConditionalGeneration", "Qwen3_5Config", "Qwen3_5Tokenizer", QWEN3_5_CHAT_TEMPLATE),
        "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeConfig", "Qwen3_5Tokenizer",
                        QWEN3_5_CHAT_TEMPLATE),
    }
    if family not in classes:
        raise ValueError(f"Unknown family {family!r}: use one of {', '.join(QWEN3_FAMILIES)}.")
    *names, template = classes[family]
    return tuple(getattr(transformers, name) for name in names) + (template,)


def build_qwen3_processor(family: str = "qwen3_vl", words: Iterable[str] = DEFAULT_WORDS,
                          min_pixels: int = 64 * 64, max_pixels: int = 32 * 32 * 256):
    """A real ``Qwen3VLProcessor`` as the Qwen3-VL and Qwen3.5 checkpoints ship it: ``Qwen2VLImageProcessor`` with
    16-pixel patches, merge 2, temporal patch 2 and mean/std 0.5, ``Qwen3VLVideoProcessor``, and a byte-level BPE
    tokenizer of the family's class with its chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    _, _, tokenizer_cls, template = _family(family)
    tokenizer = build_bpe_tokenizer(tokenizer_cls, words, special_tokens=QWEN3_SPECIAL_TOKENS, chat_template=template)
    half = [0.5, 0.5, 0.5]
    image_processor = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=half,
                                            image_std=half, min_pixels=min_pixels, max_pixels=max_pixels)
    # Qwen3-VL's video budget counts every frame: four images' worth here (small, for fast tests)
    video_processor = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=half,
                                            image_std=half, size={"shortest_edge": min_pixels,
                                                                  "longest_edge": 4 * max_pixels})
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=template)


def tiny_qwen3_config(tokenizer, family: str = "qwen3_vl", text_layers: int = 4, text_width: int = 64,
                      vision_blocks: int = 4, vision_width: int = 32, heads: int = 4, vision_heads: int = 2,
                      deepstack_visual_indexes: Sequence[int] = (1, 2), full_attention_interval: int = 2):
    """A small config of ``family``. Qwen3-VL's encoder feeds the outputs of ``deepstack_visual_indexes`` to the
    first decoder layers (DeepStack); Qwen3.5's has no DeepStack, and its decoder has a full-attention layer every
    ``full_attention_interval`` layers and Gated DeltaNet (linear attention) layers between them."""
    config_cls = _family(family)[1]
    ids = tokenizer.convert_tokens_to_ids
    qwen3_5 = family.startswith("qwen3_5")
    # Qwen3.5 rotates a quarter of each head (partial_rotary_factor 0.25), Qwen3-VL all of it; both interleave mrope.
    head_dim = 2 * text_width // heads if qwen3_5 else text_width // heads
    rotary_dim = head_dim // 4 if qwen3_5 else head_dim
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(rotary_dim),
            "mrope_interleaved": True}
    text = dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                head_dim=head_dim, max_position_embeddings=4096, pad_token_id=ids("<|endoftext|>"))
    vision = dict(depth=vision_blocks, hidden_size=vision_width, intermediate_size=2 * vision_width,
                  num_heads=vision_heads, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=text_width, num_position_embeddings=256)
    if qwen3_5:
        rope["partial_rotary_factor"] = 0.25
        text.update(layer_types=["full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
                                 for i in range(text_layers)],
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_conv_kernel_dim=4)
    else:
        vision["deepstack_visual_indexes"] = list(deepstack_visual_indexes)
    if family.endswith("_moe"):
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text_width)
        if qwen3_5:
            text["shared_expert_intermediate_size"] = text_width
    text["rope_parameters"] = rope
    return config_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                      video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                      vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)


def build_tiny_qwen3_vl(path: Optional[str | os.PathLike] = None, family: str = "qwen3_vl", seed: int = 0,
                        words: Iterable[str] = DEFAULT_WORDS, dtype: torch.dtype = torch.float32, **config_kwargs
                        ) -> Tuple[torch.nn.Module, object]:
    """Build a tiny random Qwen3-VL (``family="qwen3_vl"``), Qwen3.5 (``"qwen3_5"``) or one of their MoE variants
    (``"qwen3_vl_moe"``, ``"qwen3_5_moe"``) and its processor, save both to ``path`` with ``save_pretrained`` and
    load them back with ``from_pretrained``. Returns ``(model, processor)``."""
    model_cls = _family(family)[0]
    processor = build_qwen3_processor(family, words)
    config = tiny_qwen3_config(processor.tokenizer, family=family, **config_kwargs)
    torch.manual_seed(seed)
    return save_and_reload(model_cls(config), processor, path, model_cls, dtype, prefix=f"tiny_{family}_")
