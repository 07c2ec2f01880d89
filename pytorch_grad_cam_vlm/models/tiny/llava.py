"""Offline builders for tiny LLaVA 1.5, LLaVA-NeXT and LLaVA-OneVision models with their real processors.

As :mod:`pytorch_grad_cam_vlm.models.tiny.qwen_vl` does for Qwen2.5-VL: a small config, the family's real processor
(``LlavaProcessor``, ``LlavaNextProcessor``, ``LlavaOnevisionProcessor``) and image processor (``CLIPImageProcessor``,
``LlavaNextImageProcessor``, ``LlavaOnevisionImageProcessor``), a BPE tokenizer of the family's tokenizer class
(``LlamaTokenizer`` for LLaVA 1.5 and LLaVA-NeXT, ``Qwen2Tokenizer`` for OneVision) over a small word list, and the
structure of the released chat templates (llava-1.5-hf's ``USER: <image>\\n... ASSISTANT:``, llava-v1.6-mistral-hf's
``[INST] <image>\\n... [/INST]``, llava-onevision-qwen2-hf's ``<|im_start|>user <image>\\n...<|im_end|>``), saved with
``save_pretrained`` and loaded back with ``from_pretrained``. Nothing is downloaded.

The vision towers are scaled-down copies of the released ones: CLIP (class token, ``vision_feature_layer=-2``,
strategy ``default``) for LLaVA 1.5 and LLaVA-NeXT, SigLIP (no class token, ``vision_feature_layer=-1``, strategy
``full``) for OneVision; 32-pixel tiles of 8-pixel patches (4x4 tokens per tile). LLaVA-NeXT's grid pinpoints are the
released ones scaled from 336 to 32 pixels (1x2, 2x1, 2x2, 3x1 and 1x3 tiles); OneVision's cover every grid of up to
4x4 tiles, so that large images reach its ``anyres_max_9`` bilinear downsampling (more than 9 tiles' worth of tokens).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import torch

from pytorch_grad_cam_vlm.models.tiny.qwen_vl import DEFAULT_WORDS, build_bpe_tokenizer, save_and_reload

LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision")

# The released templates' structure (images first, then the text), less the assistant-turn details.
LLAVA_CHAT_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_CHAT_TEMPLATE = (  # llava-hf/llava-v1.6-mistral-7b-hf
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAVA_ONEVISION_CHAT_TEMPLATE = (  # llava-hf/llava-onevision-qwen2-0.5b-ov-hf
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Words of the templates, so that they are whole tokens as in the released vocabularies.
TEMPLATE_WORDS = ("USER", "ASSISTANT", "SYSTEM", ":", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "user",
                  "assistant", "system")

TILE = 32  # the tiny vision towers' image size: one tile
PATCH = 8  # their patch size: 4x4 tokens per tile
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # llava-v1.6's, scaled from 336 to 32 px
ONEVISION_PINPOINTS = [[TILE * i, TILE * j] for i in range(1, 5) for j in range(1, 5)]


def build_llava_processor(family: str = "llava", words: Iterable[str] = DEFAULT_WORDS):
    """The family's real processor around its real image processor (32-pixel tiles, the released means and
    standard deviations: CLIP's for LLaVA 1.5 and LLaVA-NeXT, 0.5 for OneVision's SigLIP) and a BPE tokenizer of the
    family's class with ``<image>`` as a special token and the family's chat template."""
    import transformers

    words = list(dict.fromkeys(list(words) + list(TEMPLATE_WORDS)))
    if _check_family(family) == "llava_onevision":
        tokenizer = build_bpe_tokenizer(
            transformers.Qwen2Tokenizer, words,
            special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"),
            chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)
        half = [0.5, 0.5, 0.5]
        image_processor = transformers.LlavaOnevisionImageProcessor(
            size={"height": TILE, "width": TILE}, image_grid_pinpoints=ONEVISION_PINPOINTS, image_mean=half,
            image_std=half)
        video_processor = transformers.LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE},
                                                                    image_mean=half, image_std=half)
        return transformers.LlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
            num_image_tokens=(TILE // PATCH) ** 2, vision_feature_select_strategy="full",
            chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE, vision_aspect_ratio="anyres_max_9")
    template = LLAVA_CHAT_TEMPLATE if family == "llava" else LLAVA_NEXT_CHAT_TEMPLATE
    tokenizer = build_bpe_tokenizer(transformers.LlamaTokenizer, words, special_tokens=("<unk>", "<s>", "</s>",
                                    "<image>", "<pad>"), chat_template=template, base_tokens=("<unk>", "<s>", "</s>"),
                                    eos_token="</s>", pad_token="<pad>", add_bos_token=True)
    common = dict(tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
                  num_additional_image_tokens=1, chat_template=template)
    if family == "llava":
        image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": TILE},
                                                          crop_size={"height": TILE, "width": TILE})
        return transformers.LlavaProcessor(image_processor=image_processor, **common)
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=NEXT_PINPOINTS)
    return transformers.LlavaNextProcessor(image_processor=image_processor, **common)


def tiny_llava_config(tokenizer, family: str = "llava", text_layers: int = 4, text_width: int = 64,
                      vision_layers: int = 3, vision_width: int = 32, heads: int = 4, vision_heads: int = 2):
    """A small config of ``family``: a CLIP (LLaVA 1.5, LLaVA-NeXT) or SigLIP (OneVision) vision tower of
    ``vision_layers`` layers on 32-pixel tiles of 8-pixel patches, and a Llama (LLaVA 1.5, LLaVA-NeXT) or Qwen2
    (OneVision) decoder of ``text_layers`` layers, with the released feature layer and strategy."""
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    vision = dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_heads, image_size=TILE, patch_size=PATCH)
    text = dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if _check_family(family) == "llava_onevision":
        return transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**vision, vision_use_head=False),
            text_config=transformers.Qwen2Config(**text, eos_token_id=ids("<|im_end|>")),
            image_token_index=ids("<image>"), video_token_index=ids("<video>"), vision_feature_layer=-1,
            vision_feature_select_strategy="full", image_grid_pinpoints=ONEVISION_PINPOINTS,
            vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)
    common = dict(vision_config=transformers.CLIPVisionConfig(**vision, projection_dim=vision_width),
                  text_config=transformers.LlamaConfig(**text, bos_token_id=tokenizer.bos_token_id,
                                                       eos_token_id=tokenizer.eos_token_id),
                  image_token_index=ids("<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default",
                  tie_word_embeddings=False)
    if family == "llava":
        return transformers.LlavaConfig(**common, image_seq_length=(TILE // PATCH) ** 2)
    return transformers.LlavaNextConfig(**common, image_grid_pinpoints=NEXT_PINPOINTS)


def build_tiny_llava(path: Optional[str | os.PathLike] = None, family: str = "llava", seed: int = 0,
                     words: Iterable[str] = DEFAULT_WORDS, dtype: torch.dtype = torch.float32, **config_kwargs
                     ) -> Tuple[torch.nn.Module, object]:
    """Build a tiny random LLaVA 1.5 (``family="llava"``), LLaVA-NeXT (``"llava_next"``) or LLaVA-OneVision
    (``"llava_onevision"``) and its processor, save both to ``path`` with ``save_pretrained`` and load them back
    with ``from_pretrained``. Returns ``(model, processor)``."""
    import transformers

    model_cls = getattr(transformers, _MODEL_CLASSES[_check_family(family)])
    processor = build_llava_processor(family, words)
    config = tiny_llava_config(processor.tokenizer, family=family, **config_kwargs)
    torch.manual_seed(seed)
    return save_and_reload(model_cls(config), processor, path, model_cls, dtype, prefix=f"tiny_{family}_")


_MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                  "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def _check_family(family: str) -> str:
    if family not in LLAVA_FAMILIES:
        raise ValueError(f"Unknown family {family!r}: use one of {', '.join(LLAVA_FAMILIES)}.")
    return family
