"""Offline builder for a tiny Gemma 4 model with its real processor.

As :mod:`pytorch_grad_cam_vlm.models.tiny.gemma3` does for Gemma 3: a small config, Gemma 4's real processor
(``Gemma4Processor``) around its real image processor (``Gemma4ImageProcessor``: the released settings, bicubic
aspect-preserving resize, rescale to 0..1 and no normalisation, ``max_soft_tokens`` 280 by default), video
processor and audio feature extractor (the processor needs them; audio and video are not explained here), a BPE
tokenizer of Gemma's class over a small word list with Gemma 4's special tokens (``<|turn>``, ``<turn|>``,
``<|image>``, ``<|image|>``, ``<image|>``, the audio and channel tokens), and the released chat template's
structure (google/gemma-4-*-it, tools left out), saved with ``save_pretrained`` and loaded back with
``from_pretrained``. Nothing is downloaded.

The vision tower has 4-pixel patches (the released one 16) pooled 3x3 into one soft token per 12-pixel cell (48),
and the smallest budget the processor accepts, 70 soft tokens (630 patches). The decoder alternates sliding-window
and global layers with vision tokens attending both ways in the sliding layers (``use_bidirectional_attention=
"vision"``); ``moe=True`` adds the mixture-of-experts block of 26B-A4B to every layer, the dense model has the
per-layer inputs of E2B/E4B. ``config_kwargs`` go to the text config (e.g. ``num_kv_shared_layers``).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import torch

from pytorch_grad_cam_vlm.models.tiny.qwen_vl import DEFAULT_WORDS, build_bpe_tokenizer, save_and_reload

# The structure of google/gemma-4-*-it's chat template (chat_template.jinja) without its tool-calling macros:
# <bos>, a system turn when there is a system message or thinking is on (<|think|> first), one turn per message
# (assistant written "model"), an image item as <|image|>, and the generation prompt with the closed thought channel
# when thinking is off.
GEMMA4_CHAT_TEMPLATE = (
    "{%- set loop_messages = messages -%}\n{{- bos_token -}}\n"
    "{%- if (enable_thinking is defined and enable_thinking) or messages[0]['role'] in ['system', 'developer'] -%}\n"
    "    {{- '<|turn>system\\n' -}}\n"
    "    {%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}\n"
    "    {%- if messages[0]['role'] in ['system', 'developer'] -%}\n"
    "        {{- messages[0]['content'] | trim -}}\n        {%- set loop_messages = messages[1:] -%}\n"
    "    {%- endif -%}\n    {{- '<turn|>\\n' -}}\n{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\n"
    "    {{- '<|turn>' + role + '\\n' -}}\n"
    "    {%- if message['content'] is string -%}\n        {{- message['content'] | trim -}}\n"
    "    {%- elif message['content'] is sequence -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}\n"
    "            {%- elif item['type'] == 'image' -%}{{- '<|image|>' -}}\n"
    "            {%- elif item['type'] == 'audio' -%}{{- '<|audio|>' -}}\n"
    "            {%- elif item['type'] == 'video' -%}{{- '<|video|>' -}}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- endif -%}\n"
    "    {{- '<turn|>\\n' -}}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n    {{- '<|turn>model\\n' -}}\n"
    "    {%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}\n"
    "{%- endif -%}\n"
)

BASE_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
MEDIA_TOKENS = {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"}
SPECIAL_TOKENS = BASE_TOKENS + ("<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|video|>") \
    + tuple(MEDIA_TOKENS.values())
TEMPLATE_WORDS = ("user", "model", "system", "thought", "\n")

PATCH = 4  # the tiny tower's patch side (the released one: 16)
POOLING = 3  # patches per soft-token side, as released: one soft token per 12-pixel cell here
MAX_SOFT_TOKENS = 70  # the smallest budget Gemma4ImageProcessor accepts


def build_gemma4_processor(words: Iterable[str] = DEFAULT_WORDS, max_soft_tokens: int = MAX_SOFT_TOKENS):
    """Gemma 4's real processor: its image processor (4-pixel patches pooled 3x3, ``max_soft_tokens``, the released
    bicubic resize without normalisation), video processor, audio feature extractor and a ``GemmaTokenizer`` with
    Gemma 4's special tokens and chat template."""
    import transformers

    words = list(dict.fromkeys(list(words) + list(TEMPLATE_WORDS)))
    tokenizer = build_bpe_tokenizer(
        transformers.GemmaTokenizer, words, special_tokens=SPECIAL_TOKENS, chat_template=GEMMA4_CHAT_TEMPLATE,
        base_tokens=BASE_TOKENS, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>",
        mask_token="<mask>", add_bos_token=True, model_specific_special_tokens=dict(MEDIA_TOKENS))
    image_processor = transformers.Gemma4ImageProcessor(patch_size=PATCH, pooling_kernel_size=POOLING,
                                                        max_soft_tokens=max_soft_tokens)
    video_processor = transformers.Gemma4VideoProcessor(patch_size=PATCH, pooling_kernel_size=POOLING,
                                                        max_soft_tokens=MAX_SOFT_TOKENS)
    return transformers.Gemma4Processor(
        feature_extractor=transformers.Gemma4AudioFeatureExtractor(), image_processor=image_processor,
        tokenizer=tokenizer, video_processor=video_processor, chat_template=GEMMA4_CHAT_TEMPLATE,
        image_seq_length=max_soft_tokens)


def tiny_gemma4_config(tokenizer, moe: bool = False, text_layers: int = 4, text_width: int = 64,
                       vision_layers: int = 2, vision_width: int = 48, heads: int = 4, vision_heads: int = 2,
                       sliding_window: int = 32, **text_kwargs):
    """A small Gemma 4 config: a vision tower of ``vision_layers`` layers (4-pixel patches pooled 3x3), a decoder
    of ``text_layers`` layers alternating sliding-window and global attention (the last one global, as Gemma 4
    requires), vision tokens attending both ways in the sliding layers; ``moe`` adds 4 experts (2 per token) to
    every layer, else each layer gets per-layer inputs. No audio tower."""
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    head_dim = text_width // heads
    vision = transformers.Gemma4VisionConfig(
        hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, num_key_value_heads=vision_heads, head_dim=vision_width // vision_heads,
        patch_size=PATCH, pooling_kernel_size=POOLING, position_embedding_size=256)
    experts = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=text_width,
                   hidden_size_per_layer_input=0) if moe else dict(hidden_size_per_layer_input=8)
    text = transformers.Gemma4TextConfig(**{
        "vocab_size": len(tokenizer), "vocab_size_per_layer_input": len(tokenizer), "hidden_size": text_width,
        "intermediate_size": 2 * text_width, "num_hidden_layers": text_layers, "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2), "head_dim": head_dim, "global_head_dim": head_dim,
        "sliding_window": sliding_window, "use_bidirectional_attention": "vision",
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers)],
        "max_position_embeddings": 4096, "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": [tokenizer.eos_token_id, ids("<turn|>")],
        **experts, **text_kwargs})
    return transformers.Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, boi_token_id=ids(MEDIA_TOKENS["boi_token"]),
        eoi_token_id=ids(MEDIA_TOKENS["eoi_token"]), image_token_id=ids(MEDIA_TOKENS["image_token"]),
        video_token_id=ids("<|video|>"), boa_token_id=ids(MEDIA_TOKENS["boa_token"]),
        eoa_token_index=ids(MEDIA_TOKENS["eoa_token"]), audio_token_id=ids(MEDIA_TOKENS["audio_token"]))


def build_tiny_gemma4(path: Optional[str | os.PathLike] = None, moe: bool = False, seed: int = 0,
                      words: Iterable[str] = DEFAULT_WORDS, dtype: torch.dtype = torch.float32,
                      max_soft_tokens: int = MAX_SOFT_TOKENS, **config_kwargs) -> Tuple[torch.nn.Module, object]:
    """Build a tiny random Gemma 4 (``Gemma4ForConditionalGeneration``; ``moe=True``: experts in every decoder
    layer, as 26B-A4B) and its processor, save both to ``path`` with ``save_pretrained`` and load them back with
    ``from_pretrained``. Returns ``(model, processor)``."""
    import transformers

    processor = build_gemma4_processor(words, max_soft_tokens)
    config = tiny_gemma4_config(processor.tokenizer, moe=moe, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.Gemma4ForConditionalGeneration(config)
    # transformers starts the position table at ones (every patch the same position); trained ones are not
    with torch.no_grad():
        model.model.vision_tower.patch_embedder.position_embedding_table.normal_(std=0.1)
    return save_and_reload(model, processor, path, transformers.Gemma4ForConditionalGeneration, dtype,
                           prefix="tiny_gemma4_")
