"""Offline builders for tiny Idefics3 and SmolVLM models with their real processors.

As :mod:`pytorch_grad_cam_vlm.models.tiny.llava` does for LLaVA: a small config, the family's real processor
(``Idefics3Processor``; ``SmolVLMProcessor`` with its video processor) and image processor
(``Idefics3ImageProcessor``, ``SmolVLMImageProcessor``: LANCZOS resizes, splitting into tiles plus a global image), a
byte-level BPE tokenizer of the released class (``GPT2Tokenizer``, as SmolVLM's SmolLM2 decoders use) over a small
word list with the released image tokens (``<fake_token_around_image>``, ``<image>``, ``<global-img>``,
``<row_i_col_j>`` for up to 6x6 tiles, ``<end_of_utterance>``) and the released chat templates' structure
(``User:<image>...<end_of_utterance>\\nAssistant:``), saved with ``save_pretrained`` and loaded back with
``from_pretrained``. Nothing is downloaded.

Scaled-down geometry: 32-pixel tiles of 4-pixel patches (8x8 patches per tile), pixel-shuffled by ``scale_factor``
2 (SmolVLM: 4x4 tokens per tile, 8-pixel cells, as Idefics3-8B's factor) or 4 (Idefics3: 2x2 tokens of 16 pixels,
as SmolVLM-256M's factor). The processor resizes a picture's longest edge to 96 pixels (three tiles; the released
processors use four tiles of 512), so pictures become 3x1 to 3x3 grids of tiles plus the global image.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import torch

from pytorch_grad_cam_vlm.models.tiny.qwen_vl import DEFAULT_WORDS, build_bpe_tokenizer, save_and_reload

IDEFICS3_FAMILIES = ("idefics3", "smolvlm")

# SmolVLM's released template (HuggingFaceTB/SmolVLM-256M-Instruct, SmolVLM2); Idefics3-8B opens with Llama 3's
# <|begin_of_text|> instead of <|im_start|>.
CHAT_TEMPLATE = (
    "{start}{{% for message in messages %}}{{{{message['role'] | capitalize}}}}"
    "{{% if message['content'][0]['type'] == 'image' %}}{{{{':'}}}}{{% else %}}{{{{': '}}}}{{% endif %}}"
    "{{% for line in message['content'] %}}{{% if line['type'] == 'text' %}}{{{{line['text']}}}}"
    "{{% elif line['type'] == 'image' %}}{{{{ '<image>' }}}}{{% endif %}}{{% endfor %}}<end_of_utterance>\n"
    "{{% endfor %}}{{% if add_generation_prompt %}}{{{{ 'Assistant:' }}}}{{% endif %}}"
)
IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
TEMPLATE_WORDS = ("User", "Assistant", "System", ":")

TILE = 32  # max_image_size: one tile, the vision encoder's image size
PATCH = 4  # 8x8 patches per tile
LONGEST_EDGE = 3 * TILE  # size["longest_edge"]: pictures are resized to three tiles on their long side
SCALE_FACTORS = {"smolvlm": 2, "idefics3": 4}


def build_idefics3_processor(family: str = "smolvlm", words: Iterable[str] = DEFAULT_WORDS):
    """The family's real processor around its real image processor (32-pixel tiles, longest edge 96, the released
    LANCZOS resampling and 0.5 means and standard deviations) and a ``GPT2Tokenizer`` with the image tokens and the
    chat template."""
    import transformers

    start = "<|begin_of_text|>" if _check_family(family) == "idefics3" else "<|im_start|>"
    template = CHAT_TEMPLATE.format(start=start)
    words = list(dict.fromkeys(list(words) + list(TEMPLATE_WORDS)))
    tokenizer = build_bpe_tokenizer(
        transformers.GPT2Tokenizer, words, special_tokens=("<|endoftext|>", start, "<|im_end|>") + IMAGE_TOKENS,
        chat_template=template, base_tokens=("<|endoftext|>",), eos_token="<end_of_utterance>",
        pad_token="<|im_end|>", bos_token=start)
    image_seq_len = (TILE // PATCH // SCALE_FACTORS[family]) ** 2
    images = dict(size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE})
    if family == "idefics3":
        return transformers.Idefics3Processor(image_processor=transformers.Idefics3ImageProcessor(**images),
                                              tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=template)
    video_processor = transformers.SmolVLMVideoProcessor(size={"longest_edge": LONGEST_EDGE},
                                                         max_image_size={"longest_edge": TILE})
    return transformers.SmolVLMProcessor(image_processor=transformers.SmolVLMImageProcessor(**images),
                                         tokenizer=tokenizer, video_processor=video_processor,
                                         image_seq_len=image_seq_len, chat_template=template)


def tiny_idefics3_config(tokenizer, family: str = "smolvlm", text_layers: int = 4, text_width: int = 64,
                         vision_layers: int = 2, vision_width: int = 32, heads: int = 4, vision_heads: int = 2):
    """A small config of ``family``: an Idefics3 (SigLIP-like) vision encoder of ``vision_layers`` layers on 32-pixel
    tiles of 4-pixel patches, the family's ``scale_factor``, and a Llama decoder of ``text_layers`` layers."""
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    vision = dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_heads, image_size=TILE, patch_size=PATCH)
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    if _check_family(family) == "idefics3":
        config_cls, vision_cls = transformers.Idefics3Config, transformers.Idefics3VisionConfig
    else:
        config_cls, vision_cls = transformers.SmolVLMConfig, transformers.SmolVLMVisionConfig
    return config_cls(vision_config=vision_cls(**vision), text_config=text, scale_factor=SCALE_FACTORS[family],
                      image_token_id=ids("<image>"), pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def build_tiny_idefics3(path: Optional[str | os.PathLike] = None, family: str = "smolvlm", seed: int = 0,
                        words: Iterable[str] = DEFAULT_WORDS, dtype: torch.dtype = torch.float32, **config_kwargs
                        ) -> Tuple[torch.nn.Module, object]:
    """Build a tiny random SmolVLM (``family="smolvlm"``, SmolVLM2's model type) or Idefics3 (``"idefics3"``, also
    SmolVLM 1's) and its processor, save both to ``path`` with ``save_pretrained`` and load them back with
    ``from_pretrained``. Returns ``(model, processor)``."""
    import transformers

    model_cls = getattr(transformers, _MODEL_CLASSES[_check_family(family)])
    processor = build_idefics3_processor(family, words)
    config = tiny_idefics3_config(processor.tokenizer, family=family, **config_kwargs)
    torch.manual_seed(seed)
    return save_and_reload(model_cls(config), processor, path, model_cls, dtype, prefix=f"tiny_{family}_")


_MODEL_CLASSES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}


def _check_family(family: str) -> str:
    if family not in IDEFICS3_FAMILIES:
        raise ValueError(f"Unknown family {family!r}: use one of {', '.join(IDEFICS3_FAMILIES)}.")
    return family
