"""Offline builder for a tiny Gemma 3 model with its real processor.

As :mod:`pytorch_grad_cam_vlm.models.tiny.qwen_vl` does for Qwen2.5-VL: a small config, Gemma 3's real processor
(``Gemma3Processor``) and image processor (``Gemma3ImageProcessor``, the released mean/std 0.5 and bilinear resize),
a BPE tokenizer of Gemma's class (``GemmaTokenizer``: spaces written as ``"▁"``, ``<bos>`` added) over a small word
list with Gemma's special tokens and named image tokens, and the released chat template (google/gemma-3-4b-it),
saved with ``save_pretrained`` and loaded back with ``from_pretrained``. Nothing is downloaded.

The vision tower is a scaled-down SigLIP on 32-pixel images of 4-pixel patches (8x8 patches); the projector
average-pools them with kernel 2 to ``mm_tokens_per_image=16`` tokens (4x4, one per 8-pixel cell), as the released
896-pixel tower's 64x64 patches are pooled with kernel 4 to 16x16. The decoder alternates sliding-window and global
layers. Pan-and-scan is a processor call option (``do_pan_and_scan=True``, with the processor's defaults: crops
of at least 256 pixels, at most 4), as for the released checkpoints.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import torch

from pytorch_grad_cam_vlm.models.tiny.qwen_vl import DEFAULT_WORDS, build_bpe_tokenizer, save_and_reload

# google/gemma-3-4b-it's chat template (tokenizer_config.json).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)

# Gemma's specials in its order (pad 0, eos 1, bos 2, unk 3, mask 4), then the turn and image tokens.
BASE_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
SPECIAL_TOKENS = BASE_TOKENS + ("<start_of_turn>", "<end_of_turn>") + tuple(IMAGE_TOKENS.values())
TEMPLATE_WORDS = ("user", "model", "Here", "here", "original", "and", "are", "some", "crops", "to", "help", "you",
                  "see", "better", "\n\n")

IMAGE_SIZE = 32  # the tiny SigLIP's image size
PATCH = 4  # its patch size: 8x8 patches, pooled to 4x4 tokens
TOKENS_PER_IMAGE = 16


def build_gemma3_processor(words: Iterable[str] = DEFAULT_WORDS):
    """Gemma 3's real processor around its real image processor (32-pixel images, mean/std 0.5, bilinear) and a
    ``GemmaTokenizer`` with Gemma's special tokens, its named image tokens and chat template."""
    import transformers

    words = list(dict.fromkeys(list(words) + list(TEMPLATE_WORDS)))
    tokenizer = build_bpe_tokenizer(
        transformers.GemmaTokenizer, words, special_tokens=SPECIAL_TOKENS, chat_template=GEMMA3_CHAT_TEMPLATE,
        base_tokens=BASE_TOKENS, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>",
        mask_token="<mask>", add_bos_token=True, model_specific_special_tokens=dict(IMAGE_TOKENS))
    half = [0.5, 0.5, 0.5]
    image_processor = transformers.Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=half, image_std=half, resample=2)
    return transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=TOKENS_PER_IMAGE)


def tiny_gemma3_config(tokenizer, text_layers: int = 4, text_width: int = 64, vision_layers: int = 2,
                       vision_width: int = 32, heads: int = 4, vision_heads: int = 2, sliding_window: int = 32):
    """A small Gemma 3 config: a SigLIP tower of ``vision_layers`` layers on 32-pixel images of 4-pixel patches,
    pooled to 16 tokens, and a Gemma 3 decoder of ``text_layers`` layers alternating sliding-window (of
    ``sliding_window`` tokens, shorter than a prompt with pan-and-scan crops) and global attention."""
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    vision = transformers.SiglipVisionConfig(
        hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    head_dim = text_width // heads
    text = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers)],
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, ids("<end_of_turn>")])
    return transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=ids(IMAGE_TOKENS["boi_token"]), eoi_token_index=ids(IMAGE_TOKENS["eoi_token"]),
        image_token_index=ids(IMAGE_TOKENS["image_token"]))


def build_tiny_gemma3(path: Optional[str | os.PathLike] = None, seed: int = 0, words: Iterable[str] = DEFAULT_WORDS,
                      dtype: torch.dtype = torch.float32, **config_kwargs
                      ) -> Tuple[torch.nn.Module, object]:
    """Build a tiny random Gemma 3 (``Gemma3ForConditionalGeneration``) and its processor, save both to ``path`` with ``save_pretrained`` and load them back with
    ``from_pretrained``. Returns ``(model, processor)``."""
    import transformers

    processor = build_gemma3_processor(words)
    config = tiny_gemma3_config(processor.tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config)
    # transformers starts the projection at zero (the image would reach nothing); trained ones are not
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        projection.normal_(std=projection.shape[0] ** -0.5)
    return save_and_reload(model, processor, path, transformers.Gemma3ForConditionalGeneration, dtype,
                           prefix="tiny_gemma3_")
