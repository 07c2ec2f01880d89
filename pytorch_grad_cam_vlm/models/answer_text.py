"""How a wrapper turns text into tokens: the answer it teacher-forces and the single-token words that targets score."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ANSWER_HINT = ("explain it as an answer: QwenVLWrapper(..., answer={word!r}) or wrapper.set_answer({word!r}), "
               "with targets=None or AnswerTarget()")


def word_token_id(tokenizer, word: str) -> int:
    """The id of the single token ``tokenizer`` makes of ``word``, tokenised as written: a leading space is kept,
    so byte-level tokenizers (Qwen's) give ``"red"`` and ``" red"`` their own ids, while word-level ones ignore it."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"Expected a non-empty word, got {word!r}.")
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"The tokenizer splits {word!r} into {len(ids)} tokens {pieces}, and one next-token logit "
                         f"cannot score it: " + ANSWER_HINT.format(word=word) + ".")
    unknown = tokenizer.unk_token_id
    if unknown is not None and ids[0] == unknown and word.strip() != tokenizer.unk_token:
        raise ValueError(f"The tokenizer does not know {word!r} (it becomes {tokenizer.unk_token}).")
    return int(ids[0])


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
                 "<image>", "<video>",  # LLaVA's
                 "<start_of_image>", "<end_of_image>", "<image_soft_token>",  # Gemma 3's
                 "<|image>", "<image|>", "<|image|>", "<|video|>",  # Gemma 4's
                 "<img>", "</img>", "<IMG_CONTEXT>",  # InternVL's
                 "<fake_token_around_image>", "<global-img>",  # Idefics3's (its tiles' markers below)
                 "[IMG]", "[IMG_BREAK]", "[IMG_END]",  # Mistral 3's
                 "<|begin_of_image|>", "<|end_of_image|>")  # GLM-4V's (and Gemma 4's <|image|>, <|video|>)
VISION_TOKENS += tuple(f"<row_{i}_col_{j}>" for i in range(1, 11) for j in range(1, 11))


def vision_token_ids(tokenizer) -> List[int]:
    """Ids of the tokens that place images and videos: an answer may not contain them."""
    unknown = tokenizer.unk_token_id
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return [i for i in ids if i is not None and i != unknown]


def check_answer(answer, processor):
    """``answer`` as the wrapper keeps it: a non-empty string, or a tuple of token ids (from a list, a 1-D tensor or
    array), without vision tokens."""
    tokenizer = processor.tokenizer
    if isinstance(answer, str):
        if not answer.strip():
            raise ValueError("The answer is empty: pass the text the model answered, e.g. answer='a red circle'.")
        found = [t for t in VISION_TOKENS if t in answer]
        if found:
            raise ValueError(f"The answer contains {found}: an answer is text after the prompt, without images.")
        return answer
    ids = tuple(int(i) for i in np.asarray(answer.cpu() if torch.is_tensor(answer) else answer).reshape(-1))
    if not ids:
        raise ValueError("The answer has no tokens.")
    found = sorted(set(ids) & set(vision_token_ids(tokenizer)))
    if found:
        raise ValueError(f"The answer's token ids contain vision tokens {tokenizer.convert_ids_to_tokens(found)}.")
    return ids


def teacher_forced(wrapper, text_inputs: Dict[str, torch.Tensor], placeholder: Optional[np.ndarray], **options
                   ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """The wrapper's text inputs with its answer's tokens at the end, and the answer's ids (``options``: processor
    keywords the layout's placeholder was encoded with; with ``placeholder`` ``None``, they carry the media, as a
    video's ``videos=`` and ``video_metadata=``).

    A text answer was tokenised with the whole chat by the processor (so token boundaries are exactly those the
    model saw); its ids are what follows the prompt's own tokens. Token ids are appended as they are.
    """
    ids = text_inputs["input_ids"][0]
    tokenizer = wrapper.processor.tokenizer
    if isinstance(wrapper.answer, str):
        prompt_text = wrapper.chat_text()[:-len(wrapper.answer)]
        # the wrapper's own processor options (Gemma 3's pan-and-scan), which change the image's tokens
        options = {**getattr(wrapper, "processor_kwargs", {}), **options}
        media = {} if placeholder is None else {"images": [placeholder]}  # None: the options carry a video
        prompt_ids = wrapper.processor(text=[prompt_text], return_tensors="pt", **media, **options)["input_ids"][0]
        n = len(prompt_ids)
        if len(ids) <= n or not torch.equal(ids[:n], prompt_ids):
            raise ValueError(f"The tokenizer merges the start of the answer {wrapper.answer!r} into the prompt's last "
                             "token; pass the answer as token ids (wrapper.set_answer(ids)).")
        answer_ids = ids[n:]
        if tokenizer.unk_token_id is not None and bool((answer_ids == tokenizer.unk_token_id).any()):
            unknown = [w for w, i in zip(tokenizer.convert_ids_to_tokens(answer_ids), answer_ids)
                       if i == tokenizer.unk_token_id]
            raise ValueError(f"The tokenizer does not know part of the answer {wrapper.answer!r} (it becomes "
                             f"{unknown}).")
        return text_inputs, answer_ids
    answer_ids = torch.tensor(wrapper.answer, dtype=ids.dtype)
    appended = {"input_ids": answer_ids, "attention_mask": torch.ones_like(answer_ids),
                "mm_token_type_ids": torch.zeros_like(answer_ids), "token_type_ids": torch.zeros_like(answer_ids)}
    unknown = sorted(set(text_inputs) - set(appended))
    if unknown:
        raise ValueError(f"Cannot append answer token ids to the processor's {unknown}: pass the answer as text.")
    return {k: torch.cat([v, appended[k].to(v.dtype)[None]], dim=1) for k, v in text_inputs.items()}, answer_ids


def prompt_inputs(wrapper, encoded: Dict[str, torch.Tensor], placeholder, media_keys: Sequence[str],
                  token_id: Optional[int] = None, **options
                  ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """From the processor's encoding of the wrapper's chat text with ``placeholder`` media: its text inputs (the
    encoding without ``media_keys``, the answer's tokens appended when the wrapper has one: :func:`teacher_forced`,
    with ``options``), the positions of its image tokens (``token_id``, by default the wrapper's
    ``image_token_id``) and the answer's ids (``None`` without an answer)."""
    token_id = wrapper.image_token_id if token_id is None else token_id
    positions = (encoded["input_ids"][0] == token_id).nonzero().flatten()
    text_inputs = {k: v for k, v in encoded.items() if k not in media_keys}
    if wrapper.answer is None:
        return text_inputs, positions, None
    text_inputs, answer_ids = teacher_forced(wrapper, text_inputs, placeholder, **options)
    return text_inputs, positions, answer_ids
