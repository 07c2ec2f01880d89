"""Offline builder for a tiny Mistral 3 model (Mistral Small 3.x, Magistral, Ministral 3) with its real processor.

As :mod:`pytorch_grad_cam_vlm.models.tiny.qwen_vl` does for Qwen2.5-VL: a small config, Mistral 3's real processor
(``PixtralProcessor``) and image processor (``PixtralImageProcessor``: aspect kept, sides rounded up to multiples of
patch x spatial merge within ``longest_edge``, CLIP's mean/std, bicubic), a BPE tokenizer of a Llama class with
Mistral's control tokens (``[INST]``, ``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``, ...) and the structure of the
released chat template (mistralai/Mistral-Small-3.1-24B-Instruct-2503: ``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]
[INST][IMG]question[/INST]``), saved with ``save_pretrained`` and loaded back with ``from_pretrained``. Nothing is
downloaded.

The vision tower is a scaled-down Pixtral (2-D rotary positions, no learned position table) with 4-pixel patches
(the released one has 14); the projector merges 2x2 patches (``spatial_merge_size=2``, as released), so one image
token covers 8x8 pixels, and ``longest_edge`` is 64 pixels (the released 1540 px is 55 patches of 28 px).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import torch

from pytorch_grad_cam_vlm.models.tiny.qwen_vl import DEFAULT_WORDS, build_bpe_tokenizer, save_and_reload

# The released template's structure (Mistral-Small-3.1-24B-Instruct-2503), less its dated default system prompt
# and tool calls: a system prompt block, then [INST] with the images and texts in order, then [/INST].
MISTRAL3_CHAT_TEMPLATE = (
    "{%- set default_system_message = 'You are a helpful assistant.' %}{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- if messages[0]['content'] is string %}"
    "{%- set system_message = messages[0]['content'] %}{%- else %}"
    "{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system_message = default_system_message %}"
    "{%- set loop_messages = messages %}{%- endif %}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{%- if message['content'] is string %}"
    "{{- '[INST]' + message['content'] + '[/INST]' }}{%- else %}{{- '[INST]' }}"
    "{%- for block in message['content'] %}{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}"
    "{%- endif %}{%- endfor %}{{- '[/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}{%- else %}"
    "{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)

BASE_TOKENS = ("<unk>", "<s>", "</s>")
CONTROL_TOKENS = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                  "<pad>")

PATCH = 4  # the tiny Pixtral's patch size; merged 2x2, one image token per 8-pixel cell
MERGE = 2
LONGEST_EDGE = 64


def build_mistral3_processor(words: Iterable[str] = DEFAULT_WORDS, longest_edge: int = LONGEST_EDGE):
    """Mistral 3's real processor (``PixtralProcessor`` with patch 4 and spatial merge 2) around its real image
    processor (``PixtralImageProcessor``, CLIP mean/std, bicubic, ``longest_edge``) and a ``LlamaTokenizer`` BPE
    tokenizer that adds ``<s>`` (the released template writes it too), with Mistral's control tokens."""
    import transformers

    tokenizer = build_bpe_tokenizer(
        transformers.LlamaTokenizer, words, special_tokens=BASE_TOKENS + CONTROL_TOKENS,
        chat_template=MISTRAL3_CHAT_TEMPLATE, base_tokens=BASE_TOKENS, eos_token="</s>", pad_token="<pad>",
        bos_token="<s>", unk_token="<unk>", add_bos_token=True)
    image_processor = transformers.PixtralImageProcessor(
        size={"longest_edge": longest_edge}, patch_size={"height": PATCH, "width": PATCH})
    return transformers.PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                         spatial_merge_size=MERGE, chat_template=MISTRAL3_CHAT_TEMPLATE)


def tiny_mistral3_config(tokenizer, text_layers: int = 4, text_width: int = 64, vision_layers: int = 2,
                         vision_width: int = 32, heads: int = 4, vision_heads: int = 2,
                         vision_feature_layer: int = -1):
    """A small Mistral 3 config: a Pixtral tower of ``vision_layers`` layers with 4-pixel patches, the released
    projector (RMSNorm, 2x2 patch merger, two linear layers) and a Mistral decoder of ``text_layers`` layers."""
    import transformers

    vision = transformers.PixtralVisionConfig(
        hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=LONGEST_EDGE, patch_size=PATCH,
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    text = transformers.MistralConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=text_width // heads, max_position_embeddings=4096, sliding_window=None,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=MERGE, vision_feature_layer=vision_feature_layer, tie_word_embeddings=False)


def build_tiny_mistral3(path: Optional[str | os.PathLike] = None, seed: int = 0, words: Iterable[str] = DEFAULT_WORDS,
                        dtype: torch.dtype = torch.float32, **config_kwargs) -> Tuple[torch.nn.Module, object]:
    """Build a tiny random Mistral 3 (``Mistral3ForConditionalGeneration``) and its processor, save both to ``path``
    with ``save_pretrained`` and load them back with ``from_pretrained``. Returns ``(model, processor)``."""
    import transformers

    processor = build_mistral3_processor(words)
    config = tiny_mistral3_config(processor.tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model_cls = transformers.Mistral3ForConditionalGeneration
    return save_and_reload(model_cls(config), processor, path, model_cls, dtype, prefix="tiny_mistral3_")
