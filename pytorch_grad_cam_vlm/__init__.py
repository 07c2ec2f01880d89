"""Visual explanations for vision-language models with the methods of pytorch-grad-cam.

The package's rooms: ``models`` (one adapter per model family on a shared base, the registry that loads a
checkpoint, the offline tiny builders), ``methods`` (SmoothGrad, layer sweeps, attention, targets, answers),
``metrics`` (ROAD imputation, pointing and occlusion, the sanity check), ``benchmark`` (data, runner, report),
``demo`` (the embedded demo models) and ``cli`` (the command line, which nothing here imports).
"""
from pytorch_grad_cam_vlm.benchmark.localization import localization_table
from pytorch_grad_cam_vlm.demo import DemoSample, load_demo_model, make_demo_samples
from pytorch_grad_cam_vlm.methods.answers import GeneratedExplanation, explain_generated, plot_per_token
from pytorch_grad_cam_vlm.methods.attention import AttentionMap, AttentionRollout
from pytorch_grad_cam_vlm.methods.auto import Explanation, explain
from pytorch_grad_cam_vlm.methods.classify import classify_and_explain
from pytorch_grad_cam_vlm.methods.prompt_words import PromptWords, prompt_word_relevance
from pytorch_grad_cam_vlm.methods.rank import Ranking, rank_captions, rank_images
from pytorch_grad_cam_vlm.methods.shapley_cam import ShapleyCAM
from pytorch_grad_cam_vlm.methods.smooth_grad import (SmoothEigenCAM, SmoothEigenGradCAM, SmoothFullGrad,
                                                      SmoothGrad, SmoothGradCAM, SmoothGradCAMElementWise,
                                                      SmoothGradCAMPlusPlus, SmoothHiResCAM, SmoothLayerCAM,
                                                      SmoothScoreCAM, SmoothShapleyCAM, SmoothXGradCAM, smooth)
from pytorch_grad_cam_vlm.methods.sweep import LayerSweep, auto_layer, layer_sweep, select_layers
from pytorch_grad_cam_vlm.methods.targets import AnswerTarget, ContrastiveTarget, WordTarget
from pytorch_grad_cam_vlm.metrics.deletion_check import check_maps
from pytorch_grad_cam_vlm.metrics.image_split import ImageSplit
from pytorch_grad_cam_vlm.metrics.localization import energy_in_box, occlusion_map, pointing_hit
from pytorch_grad_cam_vlm.metrics.map_check import MapCheck
from pytorch_grad_cam_vlm.models.ablation import TokenAblationLayer
from pytorch_grad_cam_vlm.models.classifier import ClassifierWrapper
from pytorch_grad_cam_vlm.models.clip import CLIPWrapper
from pytorch_grad_cam_vlm.models.gemma3 import Gemma3Wrapper
from pytorch_grad_cam_vlm.models.glm4v import Glm4vWrapper
from pytorch_grad_cam_vlm.models.gemma4 import Gemma4Wrapper
from pytorch_grad_cam_vlm.models.idefics3 import Idefics3Wrapper
from pytorch_grad_cam_vlm.models.internvl import InternVLWrapper
from pytorch_grad_cam_vlm.models.llava import LlavaWrapper
from pytorch_grad_cam_vlm.models.mistral3 import Mistral3Wrapper
from pytorch_grad_cam_vlm.models.multi_image import MultiImage, image_maps, mass_shares
from pytorch_grad_cam_vlm.models.qwen3_vl import Qwen3VLWrapper
from pytorch_grad_cam_vlm.models.qwen_patches import patchify
from pytorch_grad_cam_vlm.models.qwen_vl import QwenVLWrapper
from pytorch_grad_cam_vlm.models.tiny.clip import build_tiny_clip
from pytorch_grad_cam_vlm.models.tiny.gemma3 import build_tiny_gemma3
from pytorch_grad_cam_vlm.models.tiny.glm4v import build_tiny_glm4v
from pytorch_grad_cam_vlm.models.tiny.gemma4 import build_tiny_gemma4
from pytorch_grad_cam_vlm.models.tiny.idefics3 import build_tiny_idefics3
from pytorch_grad_cam_vlm.models.tiny.internvl import build_tiny_internvl
from pytorch_grad_cam_vlm.models.tiny.llava import build_tiny_llava
from pytorch_grad_cam_vlm.models.tiny.mistral3 import build_tiny_mistral3
from pytorch_grad_cam_vlm.models.tiny.qwen3_vl import build_tiny_qwen3_vl
from pytorch_grad_cam_vlm.models.tiny.qwen_vl import build_tiny_model

__all__ = [
    "AnswerTarget", "AttentionMap", "AttentionRollout", "CLIPWrapper", "ContrastiveTarget", "DemoSample",
    "GeneratedExplanation", "LayerSweep", "auto_layer", "energy_in_box", "layer_sweep", "load_demo_model",
    "localization_table", "make_demo_samples", "occlusion_map", "pointing_hit", "select_layers",
    "Qwen3VLWrapper", "QwenVLWrapper", "ShapleyCAM", "SmoothEigenCAM", "SmoothEigenGradCAM", "SmoothFullGrad",
    "SmoothGrad", "SmoothGradCAM", "SmoothGradCAMElementWise", "SmoothGradCAMPlusPlus", "SmoothHiResCAM",
    "SmoothLayerCAM", "SmoothScoreCAM", "SmoothShapleyCAM", "SmoothXGradCAM", "TokenAblationLayer", "WordTarget",
    "build_tiny_clip", "build_tiny_model", "build_tiny_qwen3_vl", "explain_generated", "patchify", "plot_per_token",
    "smooth", "Explanation", "MapCheck", "check_maps", "explain",
    "LlavaWrapper", "build_tiny_llava",
    "Gemma3Wrapper", "build_tiny_gemma3",
    "Gemma4Wrapper", "build_tiny_gemma4",
    "Idefics3Wrapper", "build_tiny_idefics3",
    "InternVLWrapper", "build_tiny_internvl",
    "Mistral3Wrapper", "build_tiny_mistral3",
    "Glm4vWrapper", "build_tiny_glm4v",
    "ClassifierWrapper", "classify_and_explain",
    "PromptWords", "prompt_word_relevance", "Ranking", "rank_captions", "rank_images",
    "MultiImage", "ImageSplit", "image_maps", "mass_shares",
]
__version__ = "0.3.0"
