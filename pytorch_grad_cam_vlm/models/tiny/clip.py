"""Offline builders for tiny CLIP, SigLIP and SigLIP 2 models and processors.

Like :mod:`pytorch_grad_cam_vlm.models.tiny.qwen_vl`: a small config, the family's real image processor, a word-level tokenizer
with the family's special tokens, saved with ``save_pretrained`` and loaded back with ``from_pretrained`` (through
``AutoModel`` / ``AutoProcessor``), so that the real loading path runs. Nothing is downloaded.
"""
from __future__ import annotations

import os
import string
from typing import Iterable, Optional, Tuple

import torch

from pytorch_grad_cam_vlm.models.tiny.qwen_vl import save_and_reload

CLIP_FAMILIES = ("clip", "siglip", "siglip2")

DEFAULT_WORDS = ("a photo of the an dog cat red green blue circle square triangle white black "
                 "big small shape on left right top bottom").split()

# The special tokens each family's tokenizer wraps a text in. CLIP pools at the first end-of-text token; an
# ``eos_token_id`` of 2 would switch it to its legacy argmax pooling, so the end token comes first in the vocabulary.
_TOKENS = {
    "clip": dict(eos="<|endoftext|>", bos="<|startoftext|>", pad="<|endoftext|>",
                 template="<|startoftext|> $A <|endoftext|>"),
    "siglip": dict(eos="</s>", bos=None, pad="</s>", template="$A </s>"),
}


def build_clip_tokenizer(family: str = "clip", words: Iterable[str] = DEFAULT_WORDS, max_length: int = 16):
    """A word-level fast tokenizer with the family's start/end/pad tokens, lower-casing and whitespace splitting;
    for SigLIP 2, whose processor insists on its own tokenizer class, a character-level ``Siglip2Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if _check_family(family) == "siglip2":
        from transformers import Siglip2Tokenizer

        characters = {token: i for i, token in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))}
        for character in "\u2581" + string.ascii_lowercase + string.digits + ".,:;?!'-":
            characters.setdefault(character, len(characters))
        return Siglip2Tokenizer(vocab=characters, merges=[], model_max_length=max_length)
    tokens = _TOKENS[family]
    specials = [t for t in dict.fromkeys((tokens["eos"], tokens["bos"], tokens["pad"])) if t is not None]
    vocab = {}
    for token in ["[UNK]"] + specials + list(words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(
        single=tokens["template"], special_tokens=[(t, vocab[t]) for t in specials])
    special_kwargs = {k + "_token": v for k, v in tokens.items() if k != "template" and v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=max_length,
                                   **special_kwargs)


def tiny_clip_config(tokenizer, family: str = "clip", image_size: int = 32, patch_size: int = 8, width: int = 32,
                     layers: int = 3, heads: int = 4, max_length: int = 16, num_patches: int = 16):
    """A small two-tower config; ``num_patches`` is SigLIP 2's learned position grid (a square number)."""
    import transformers

    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads)
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(tower, patch_size=patch_size, num_channels=3)
    if family == "clip":
        return transformers.CLIPConfig(text_config=text, vision_config=dict(vision, image_size=image_size),
                                       projection_dim=width)
    if family == "siglip":
        return transformers.SiglipConfig(text_config=text, vision_config=dict(vision, image_size=image_size))
    return transformers.Siglip2Config(text_config=text, vision_config=dict(vision, num_patches=num_patches))


def build_clip_processor(family: str = "clip", words: Iterable[str] = DEFAULT_WORDS, image_size: int = 32,
                         patch_size: int = 8, max_length: int = 16):
    """The family's real processor (``CLIPProcessor``, ``SiglipProcessor``, ``Siglip2Processor``) around its real
    image processor and a tiny tokenizer. ``Siglip2Processor`` itself sets 16-pixel patches, at most 256 of them,
    and texts padded to 64 tokens."""
    import transformers

    tokenizer = build_clip_tokenizer(family, words, max_length)
    if _check_family(family) == "clip":
        image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                          crop_size={"height": image_size, "width": image_size})
        return transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if family == "siglip":
        image_processor = transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size})
        return transformers.SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    image_processor = transformers.Siglip2ImageProcessor(patch_size=patch_size)
    return transformers.Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_clip(path: Optional[str | os.PathLike] = None, family: str = "clip", seed: int = 0,
                    words: Iterable[str] = DEFAULT_WORDS, image_size: int = 32, patch_size: Optional[int] = None,
                    dtype: torch.dtype = torch.float32, **config_kwargs) -> Tuple[torch.nn.Module, object]:
    """Build a tiny random CLIP, SigLIP or SigLIP 2 model and its processor, save both to ``path`` and load them
    back with ``AutoModel`` / ``AutoProcessor``. Returns ``(model, processor)``.

    CLIP and SigLIP see ``image_size`` pixels square in patches of ``patch_size`` (default 8); SigLIP 2's processor
    resizes each image to at most 256 patches of 16 pixels, keeping its aspect ratio.
    """
    from transformers import AutoModel

    siglip2 = _check_family(family) == "siglip2"
    patch_size = patch_size or (16 if siglip2 else 8)
    max_length = 64 if siglip2 else 16
    processor = build_clip_processor(family, words, image_size, patch_size, max_length)
    config = tiny_clip_config(processor.tokenizer, family, image_size=image_size, patch_size=patch_size,
                              max_length=max_length, **config_kwargs)
    torch.manual_seed(seed)
    return save_and_reload(AutoModel.from_config(config), processor, path, AutoModel, dtype, prefix=f"tiny_{family}_")


def _check_family(family: str) -> str:
    if family not in CLIP_FAMILIES:
        raise ValueError(f"Unknown family {family!r}: use one of {', '.join(CLIP_FAMILIES)}.")
    return family
