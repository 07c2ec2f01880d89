"""Offline builder for tiny InternVL models (transformers' ``internvl`` model type) with their real processor.

As :mod:`pytorch_grad_cam_vlm.models.tiny.qwen_vl` does for Qwen2.5-VL: a small config (an InternVL vision encoder
and a Qwen2 decoder, as in InternVL3), the family's real processor (``InternVLProcessor``), image processor
(``GotOcr2ImageProcessor``, which crops the dynamic tiles and the thumbnail) and video processor
(``InternVLVideoProcessor``), a BPE tokenizer of the family's class (``Qwen2Tokenizer``) over a small word list with
InternVL's named image tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``), and the chat template of the
released ``-hf`` checkpoints (transformers' ``convert_internvl_weights_to_hf.py``), saved with ``save_pretrained``
and loaded back with ``from_pretrained``. Nothing is downloaded.

The vision encoder works on 32-pixel tiles of 4-pixel patches: 8x8 patches, 4x4 tokens per tile after the pixel
shuffle (downsample ratio 0.5), so one token covers 8x8 pixels (28x28 at the released 448 / 14). The processor tiles
with 1 to 6 tiles, so pictures of different aspect ratios get 1x1, 1x2, 2x1, 2x2, 3x1 ... grids.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import torch

from pytorch_grad_cam_vlm.models.tiny.qwen_vl import (DEFAULT_WORDS, QWEN_SPECIAL_TOKENS, build_bpe_tokenizer,
                                                      save_and_reload)

# The released -hf checkpoints' template: each image becomes one <IMG_CONTEXT>, which the processor expands.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
# InternVL3's tokenizer: Qwen2.5-VL's special tokens and these, four of them named for the processor.
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
INTERNVL_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>",
                                                 "</ref>", "<box>", "</box>", "<video>")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # the released image processor's

TILE = 32  # the tiny vision encoder's image size: one tile
PATCH = 4  # its patch size: 8x8 patches, 4x4 tokens per tile after the pixel shuffle
MAX_TILES = 6


def build_internvl_processor(words: Iterable[str] = DEFAULT_WORDS, max_patches: int = MAX_TILES):
    """The real ``InternVLProcessor`` around a ``GotOcr2ImageProcessor`` of 32-pixel tiles (1 to ``max_patches``
    tiles, ImageNet mean and standard deviation, as released) and a ``Qwen2Tokenizer`` with InternVL's image tokens
    and chat template."""
    import transformers

    tokenizer = build_bpe_tokenizer(transformers.Qwen2Tokenizer, words, special_tokens=INTERNVL_SPECIAL_TOKENS,
                                    chat_template=INTERNVL_CHAT_TEMPLATE, **IMAGE_TOKENS)
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": TILE, "width": TILE}, min_patches=1, max_patches=max_patches, image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD)
    video_processor = transformers.InternVLVideoProcessor(size={"height": TILE, "width": TILE},
                                                          image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return transformers.InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          video_processor=video_processor, chat_template=INTERNVL_CHAT_TEMPLATE,
                                          image_seq_length=(TILE // PATCH // 2) ** 2)


def tiny_internvl_config(tokenizer, text_layers: int = 4, text_width: int = 64, vision_layers: int = 2,
                         vision_width: int = 32, heads: int = 4, vision_heads: int = 2):
    """A small ``InternVLConfig``: an InternVL vision encoder of ``vision_layers`` layers on 32-pixel tiles of
    4-pixel patches, the released downsample ratio 0.5, feature layer -1 and strategy ``"default"``, and a Qwen2
    decoder of ``text_layers`` layers."""
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    vision = transformers.InternVLVisionConfig(
        hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=TILE, patch_size=PATCH)
    text = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False)
    return transformers.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=ids("<IMG_CONTEXT>"),
        image_seq_length=(TILE // PATCH // 2) ** 2, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False)


def build_tiny_internvl(path: Optional[str | os.PathLike] = None, seed: int = 0, words: Iterable[str] = DEFAULT_WORDS,
                        dtype: torch.dtype = torch.float32, max_patches: int = MAX_TILES, **config_kwargs
                        ) -> Tuple[torch.nn.Module, object]:
    """Build a tiny random InternVL (``InternVLForConditionalGeneration``) and its processor, save both to ``path``
    with ``save_pretrained`` and load them back with ``from_pretrained``. Returns ``(model, processor)``."""
    import transformers

    processor = build_internvl_processor(words, max_patches)
    config = tiny_internvl_config(processor.tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model_cls = transformers.InternVLForConditionalGeneration
    return save_and_reload(model_cls(config), processor, path, model_cls, dtype, prefix="tiny_internvl_")
