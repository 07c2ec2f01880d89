"""Which family a checkpoint belongs to, how to load it, and how to wrap it: read from the config alone, so that
every entry point (the CLI, the benchmark) checks a model before loading its weights."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from pytorch_grad_cam_vlm.errors import InputError


@dataclass(frozen=True)
class PromptFamily:
    """A family that takes a prompt and explains next tokens: its transformers model class, its wrapper class
    (``module:Class`` under ``pytorch_grad_cam_vlm.models``) and its name in messages."""

    model_class: str
    wrapper: str
    name: str


# model_type -> PromptFamily: one row per supported family; every one of them picks from its decoder layers.
PROMPT_FAMILIES = {
    "qwen3_5": PromptFamily("Qwen3_5ForConditionalGeneration", "qwen3_vl:Qwen3VLWrapper", "Qwen3.5"),
    "qwen3_5_moe": PromptFamily("Qwen3_5MoeForConditionalGeneration", "qwen3_vl:Qwen3VLWrapper", "Qwen3.5-MoE"),
    "qwen3_vl": PromptFamily("Qwen3VLForConditionalGeneration", "qwen3_vl:Qwen3VLWrapper", "Qwen3-VL"),
    "qwen3_vl_moe": PromptFamily("Qwen3VLMoeForConditionalGeneration", "qwen3_vl:Qwen3VLWrapper", "Qwen3-VL-MoE"),
    "qwen2_5_vl": PromptFamily("Qwen2_5_VLForConditionalGeneration", "qwen_vl:QwenVLWrapper", "Qwen2.5-VL"),
    "qwen2_vl": PromptFamily("Qwen2VLForConditionalGeneration", "qwen_vl:QwenVLWrapper", "Qwen2-VL"),
    "llava": PromptFamily("LlavaForConditionalGeneration", "llava:LlavaWrapper", "LLaVA 1.5"),
    "llava_next": PromptFamily("LlavaNextForConditionalGeneration", "llava:LlavaWrapper", "LLaVA-NeXT"),
    "llava_onevision": PromptFamily("LlavaOnevisionForConditionalGeneration", "llava:LlavaWrapper",
                                    "LLaVA-OneVision"),
    "gemma3": PromptFamily("Gemma3ForConditionalGeneration", "gemma3:Gemma3Wrapper", "Gemma 3"),
    "internvl": PromptFamily("InternVLForConditionalGeneration", "internvl:InternVLWrapper", "InternVL"),
    "idefics3": PromptFamily("Idefics3ForConditionalGeneration", "idefics3:Idefics3Wrapper", "Idefics3 / SmolVLM"),
    "smolvlm": PromptFamily("SmolVLMForConditionalGeneration", "idefics3:Idefics3Wrapper", "SmolVLM2"),
    "gemma4": PromptFamily("Gemma4ForConditionalGeneration", "gemma4:Gemma4Wrapper", "Gemma 4"),
    "mistral3": PromptFamily("Mistral3ForConditionalGeneration", "mistral3:Mistral3Wrapper", "Mistral 3"),
    "glm4v": PromptFamily("Glm4vForConditionalGeneration", "glm4v:Glm4vWrapper", "GLM-4V"),
    "glm4v_moe": PromptFamily("Glm4vMoeForConditionalGeneration", "glm4v:Glm4vWrapper", "GLM-4V-MoE"),
    "glm46v": PromptFamily("Glm46VForConditionalGeneration", "glm4v:Glm4vWrapper", "GLM-4.6V"),
}
# model_type -> model class of the prompt-taking families (kept under its first name: Qwen's were the first).
QWEN_MODEL_CLASSES = {family: row.model_class for family, row in PROMPT_FAMILIES.items()}

CLIP_FAMILIES = ("clip", "siglip", "siglip2")
# The families that take a video (``wrapper.preprocess_video``): Qwen's own video processors and encoders.
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = {"cpu": ("", lambda: True), "cuda": ("CUDA is missing", torch.cuda.is_available),
                "mps": ("MPS (Apple's GPU backend) is missing", torch.backends.mps.is_available)}
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"Unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps.") from error
    if device.type not in backends:
        raise InputError(f"Unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps.")
    missing, available = backends[device.type]
    if not available():
        raise InputError(f"Device {name} is not available here: {missing}; use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"Device {name} is not available here: there are {torch.cuda.device_count()} CUDA "
                         "devices (cuda:0 ...); use one of them or --device cpu.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_config(name: str):
    """``(config, family)`` of a model folder or hub id, read from its config alone and checked to be supported."""
    from transformers import AutoConfig

    from pytorch_grad_cam_vlm.models.classifier import is_classifier_spec

    if is_classifier_spec(name):  # torchvision:NAME, timm:NAME have no config.json; `explain` takes them
        raise InputError(f"{name} is an image classifier: explain it with `explain --model {name} --weights PATH`; "
                         "this command takes vision-language models.")
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        if not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
            raise InputError(f"Model folder not found or without config.json: {name}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not os.path.exists(os.path.expanduser(name)):
        check_hub_id(name)
    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(name), local_files_only=offline)
    except OSError as error:
        if offline:  # no retries: say at once that the hub cannot be reached
            raise InputError(f"Model {name!r} is neither a local folder nor in the Hugging Face cache, and "
                             "HF_HUB_OFFLINE is set: download it where there is a network, or pass a local "
                             "folder.") from error
        reason = str(error).strip().split("\n")[0]
        raise InputError(f"Cannot read the model config of {name!r}: {reason}") from error
    except Exception as error:  # noqa: BLE001 (parsing and unknown-architecture errors alike)
        reason = str(error).strip().split("\n")[0]
        raise InputError(f"Cannot read the model config of {name!r}: {reason}") from error
    family = getattr(config, "model_type", None)
    if family not in QWEN_MODEL_CLASSES and family not in CLIP_FAMILIES:
        names = [row.name for row in PROMPT_FAMILIES.values()] + ["CLIP", "SigLIP", "SigLIP 2"]
        raise InputError(f"Model family {family!r} is not supported: use a {', '.join(names[:-1])} or {names[-1]} "
                         "model.")
    return config, family


def check_hub_id(name: str) -> None:
    """A hub id that is not in the local cache is looked up once on the hub, so that one that does not exist, or a
    hub that cannot be reached, fails at once with one line (a download would first retry for a minute or more)."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
        model_info(name, timeout=10)
    except GatedRepoError:  # it exists: the download says how to get access
        return
    except HFValidationError as error:
        raise InputError(f"Model {name!r} is neither a local folder nor a Hugging Face hub id (owner/name).") \
            from error
    except RepositoryNotFoundError as error:
        raise InputError(f"Model {name!r} is not a local folder, and the Hugging Face hub has no model of that name "
                         "(or it is private: log in with `hf auth login`); check the spelling.") from error
    except Exception as error:  # noqa: BLE001 (the HTTP client's connection and timeout errors)
        raise InputError(f"Model {name!r} is not a local folder nor in the Hugging Face cache, and the hub cannot "
                         f"be reached ({str(error).splitlines()[0] or type(error).__name__}): check the network, or "
                         "pass a local folder.") from error


def layer_count(config, family: str) -> int:
    """How many layers the CLI picks from: Qwen's decoder layers (Gemma 4's before those that share keys and
    values, as its wrapper's ``layers``), CLIP's vision layers."""
    if family in QWEN_MODEL_CLASSES:
        text = getattr(config, "text_config", config)  # transformers 4.x: on the config itself
        return text.num_hidden_layers - int(getattr(text, "num_kv_shared_layers", 0) or 0)
    return config.vision_config.num_hidden_layers


def check_question(family: str, prompt: Optional[str], texts: Optional[Sequence[str]], answer: Optional[str] = None,
                   per_token: bool = False) -> None:
    """Qwen models take a ``--prompt`` (and may take ``--answer`` / ``--per-token``), CLIP models ``--texts``."""
    if (answer is not None or per_token) and family not in QWEN_MODEL_CLASSES:
        raise InputError(f"--answer and --per-token explain a Qwen model's answer; a {family} model takes --texts.")
    if answer is not None and not answer.strip():
        raise InputError("--answer is empty: give the answer text to explain, or leave it out.")
    if family in QWEN_MODEL_CLASSES:
        if not prompt:
            raise InputError(f"A {family} model needs --prompt, the question to explain.")
        if texts:
            raise InputError("--texts is for CLIP and SigLIP models; a Qwen model takes --prompt.")
        return
    if not texts:
        raise InputError(f"A {family} model needs --texts, the captions to score the image against.")
    if prompt:
        raise InputError(f"--prompt is for Qwen models; a {family} model takes --texts.")
    if len(set(texts)) != len(texts):
        raise InputError(f"--texts must be distinct, got {list(texts)}.")


def check_video_family(family: str) -> None:
    """Refuse ``--video`` on a family that takes no video here."""
    if family not in VIDEO_FAMILIES:
        name = PROMPT_FAMILIES[family].name if family in PROMPT_FAMILIES else family.upper()
        takes = ", ".join(PROMPT_FAMILIES[f].name for f in VIDEO_FAMILIES)
        raise InputError(f"--video takes {takes} models; a {name} model takes no video here: explain its frames one "
                         "at a time with --image (a folder of frames runs as a batch).")


def skip_last(family: str, gradients: bool) -> bool:
    """Whether the last layer's image positions get no gradient: Qwen's decoder, and CLIP, which pools its class
    token (SigLIP pools every patch)."""
    return gradients and (family in QWEN_MODEL_CLASSES or family == "clip")


def load_model(name: str, family: str, dtype: torch.dtype, device: torch.device, allow_pickle: bool = False,
               trust_remote_code: bool = False):
    """``(model, processor)`` of a supported family, in eval mode on ``device``. Weights load from safetensors
    only: a pickle checkpoint (``pytorch_model.bin``) can run code when loaded, so it needs ``allow_pickle``; the
    model's own Python code runs only with ``trust_remote_code``."""
    import transformers

    model_cls = getattr(transformers, QWEN_MODEL_CLASSES[family]) if family in QWEN_MODEL_CLASSES \
        else transformers.AutoModel
    path = os.path.expanduser(name)
    try:
        model = model_cls.from_pretrained(path, dtype=dtype, use_safetensors=None if allow_pickle else True,
                                          trust_remote_code=trust_remote_code)
    except OSError as error:
        if allow_pickle or "safetensors" not in str(error).lower():
            raise
        raise InputError(f"{name} has no safetensors weights: a pickle checkpoint can run code when loaded; convert "
                         "it to safetensors, or pass --allow-pickle if you trust its source.") from error
    processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


@dataclass
class Subject:
    """A wrapped model as the CLI explains it: its wrapper, the layers to pick from, and how it predicts."""

    wrapper: torch.nn.Module
    layers: List[torch.nn.Module]
    family: str

    def predict(self, x: torch.Tensor) -> Tuple[int, str, float]:
        """The predicted class of the clean image, ``(index, label, probability)``: the next token and its
        softmax probability for Qwen; the best text and its probability (softmax over the texts for CLIP, sigmoid
        for SigLIP) for CLIP models."""
        with torch.no_grad():
            logits = self.wrapper(x)[0].float()
        index = int(logits.argmax())
        if getattr(self.wrapper, "answer", None) is not None:  # the answer's score: sum of its log-probabilities
            return 0, str(self.wrapper.answer), float(logits[0].exp())
        if self.family in QWEN_MODEL_CLASSES:
            return index, self.wrapper.processor.tokenizer.decode([index]), float(logits.softmax(-1)[index])
        probabilities = logits.softmax(-1) if self.family == "clip" else logits.sigmoid()
        return index, self.wrapper.texts[index], float(probabilities[index])


def make_subject(family: str, model, processor, prompt: Optional[str], texts: Optional[Sequence[str]]) -> Subject:
    """The wrapper of a loaded model (:func:`check_question` has checked ``prompt`` and ``texts``)."""
    if family in PROMPT_FAMILIES:
        module, name = PROMPT_FAMILIES[family].wrapper.split(":")
        wrapper_cls = getattr(importlib.import_module(f"pytorch_grad_cam_vlm.models.{module}"), name)
        wrapper = wrapper_cls(model, processor, prompt=prompt)
        return Subject(wrapper, wrapper.layers, family)
    from pytorch_grad_cam_vlm.models.clip import CLIPWrapper

    wrapper = CLIPWrapper(model, processor, texts=list(texts))
    return Subject(wrapper, wrapper.layers, family)
