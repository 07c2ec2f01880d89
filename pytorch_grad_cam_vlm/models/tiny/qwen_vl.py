"""Offline builders for tiny Qwen2-VL / Qwen2.5-VL models and processors.

Tests, tutorials and the demo build their models here: from a config, with a word-level tokenizer that carries
Qwen's special tokens and chat template, saved with ``save_pretrained`` and loaded back with ``from_pretrained`` so
that the real loading path runs. Nothing is downloaded.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Tuple

import torch

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Qwen2.5-VL's own chat template (system prompt, vision placeholders, generation prompt).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_WORDS = (
    "You are a helpful assistant . system user assistant What color is the circle square triangle shape ? "
    "Describe image this a an of in on left right top bottom red green blue yellow white black big small "
    "Which where Where how many one two three yes no Picture Video : , ! colour object"
).split()


def build_tokenizer(words: Iterable[str] = DEFAULT_WORDS, special_tokens: Sequence[str] = QWEN_SPECIAL_TOKENS,
                    chat_template: str = QWEN_CHAT_TEMPLATE):
    """A word-level fast tokenizer with Qwen's special tokens, whitespace/punctuation pre-tokenisation and
    Qwen's chat template (by default Qwen2.5-VL's; the Qwen3 families pass theirs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special_tokens = tuple(special_tokens)
    vocab = {}
    for token in ("[UNK]",) + special_tokens + tuple(words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=list(special_tokens),
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_bpe_tokenizer(tokenizer_cls, words: Iterable[str] = DEFAULT_WORDS,
                        special_tokens: Sequence[str] = QWEN_SPECIAL_TOKENS, chat_template: str = QWEN_CHAT_TEMPLATE,
                        base_tokens: Sequence[str] = ("<|endoftext|>",), **tokenizer_kwargs):
    """A byte-level BPE tokenizer of one of Qwen's own tokenizer classes (``Qwen2Tokenizer``, ``Qwen3_5Tokenizer``),
    with that class's pre-tokenizer and merges trained here so that each of ``words`` is one token, with and
    without a leading space (``"red"`` and ``" red"`` have their own ids, as in Qwen's real vocabulary), plus Qwen's
    special tokens and ``chat_template``. For families whose ``AutoTokenizer`` insists on its own class.

    Other BPE classes work alike (``LlamaTokenizer`` for LLaVA, whose Metaspace pre-tokenizer gives ``"▁red"``;
    ``GemmaTokenizer``, whose normaliser does, trained with it):
    ``base_tokens`` open the trained vocabulary (Qwen's ``<|endoftext|>``; Llama's ``<unk>``, ``<s>``, ``</s>``),
    the rest of ``special_tokens`` is added after it, and ``tokenizer_kwargs`` go to the class (default: Qwen's
    ``eos_token`` and ``pad_token``)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = list(words)
    trainer = trainers.BpeTrainer(vocab_size=1 << 20, min_frequency=1, special_tokens=list(base_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe = Tokenizer(models.BPE())
    template = tokenizer_cls().backend_tokenizer
    if template.normalizer is not None:  # Gemma's writes spaces as "▁" before its pre-tokenizer runs
        bpe.normalizer = template.normalizer
    bpe.pre_tokenizer = template.pre_tokenizer
    bpe.train_from_iterator(words + [" " + word for word in words] + ["\n"], trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer_kwargs = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **tokenizer_kwargs}
    tokenizer = tokenizer_cls(vocab=trained["vocab"], merges=[tuple(merge) for merge in trained["merges"]],
                              extra_special_tokens=[t for t in special_tokens if t not in base_tokens],
                              **tokenizer_kwargs)
    tokenizer.chat_template = chat_template
    return tokenizer


def build_processor(words: Iterable[str] = DEFAULT_WORDS, min_pixels: int = 56 * 56,
                    max_pixels: int = 28 * 28 * 256, family: str = "qwen2_5_vl"):
    """A real ``Qwen2_5_VLProcessor`` (or ``Qwen2VLProcessor``) with a word-level tokenizer; its video processor
    resizes each frame within the image processor's pixel bounds (small, for fast tests)."""
    from transformers import Qwen2VLImageProcessor

    tokenizer = build_tokenizer(words)
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor_cls = _family_classes(family)[1]
    kwargs = {}
    try:
        from transformers import Qwen2VLVideoProcessor
        kwargs["video_processor"] = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    except ImportError:  # transformers < 4.52 has no video processor class
        pass
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                         chat_template=QWEN_CHAT_TEMPLATE, **kwargs)


def _family_classes(family: str):
    import transformers

    if family == "qwen2_5_vl":
        return (transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLProcessor,
                transformers.Qwen2_5_VLConfig)
    if family == "qwen2_vl":
        return (transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor,
                transformers.Qwen2VLConfig)
    raise ValueError(f"Unknown family {family!r}: use 'qwen2_5_vl' or 'qwen2_vl'.")


def mrope_section(rotary_dim: int) -> list:
    """How mrope splits the ``rotary_dim / 2`` rotary frequencies over (t, h, w): the rest to t, a third each to h
    and w."""
    half = rotary_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def tiny_config(tokenizer, family: str = "qwen2_5_vl", text_layers: int = 4, text_width: int = 64,
                vision_blocks: int = 4, vision_width: int = 32, window_size: int = 56,
                fullatt_block_indexes: Sequence[int] = (1, 3), heads: int = 4, vision_heads: int = 2):
    """A small config whose vision encoder keeps real window attention (windows of ``window_size`` pixels) with
    full-attention blocks at ``fullatt_block_indexes``."""
    config_cls = _family_classes(family)[2]
    ids = tokenizer.convert_tokens_to_ids
    section = mrope_section(text_width // heads)
    text = dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": section},
                rope_theta=10000.0, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False)
    vision = dict(depth=vision_blocks, hidden_size=vision_width, num_heads=vision_heads, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if family == "qwen2_5_vl":
        vision.update(intermediate_size=2 * vision_width, out_hidden_size=text_width, window_size=window_size,
                      fullatt_block_indexes=list(fullatt_block_indexes))
    else:
        vision.update(embed_dim=vision_width, mlp_ratio=2, hidden_size=text_width)
    return config_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                      video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                      vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)


def build_tiny_model(path: Optional[str | os.PathLike] = None, family: str = "qwen2_5_vl", seed: int = 0,
                     words: Iterable[str] = DEFAULT_WORDS, dtype: torch.dtype = torch.float32, **config_kwargs
                     ) -> Tuple[torch.nn.Module, object]:
    """Build a tiny random Qwen2.5-VL (or Qwen2-VL) and its processor, save both to ``path`` with
    ``save_pretrained`` and load them back with ``from_pretrained``. Returns ``(model, processor)``."""
    model_cls = _family_classes(family)[0]
    processor = build_processor(words, family=family)
    config = tiny_config(processor.tokenizer, family=family, **config_kwargs)
    torch.manual_seed(seed)
    return save_and_reload(model_cls(config), processor, path, model_cls, dtype, prefix=f"tiny_{family}_")


def save_and_reload(model: torch.nn.Module, processor, path: Optional[str | os.PathLike], model_cls, dtype: torch.dtype,
                    prefix: str = "tiny_") -> Tuple[torch.nn.Module, object]:
    """Save ``model`` and ``processor`` to ``path`` (a new temporary folder when ``None``) and load them back with
    ``model_cls.from_pretrained`` and ``AutoProcessor.from_pretrained``, so that the real loading path runs."""
    import tempfile

    from transformers import AutoProcessor

    path = tempfile.mkdtemp(prefix=prefix) if path is None else path
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model_cls.from_pretrained(path, dtype=dtype).eval(), AutoProcessor.from_pretrained(path)
