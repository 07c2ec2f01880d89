"""Visual explanations for vision-language models with the methods of pytorch-grad-cam."""
from pytorch_grad_cam_vlm.ablation import TokenAblationLayer
from pytorch_grad_cam_vlm.answers import GeneratedExplanation, explain_generated, plot_per_token
from pytorch_grad_cam_vlm.attention import AttentionMap, AttentionRollout
from pytorch_grad_cam_vlm.demo import DemoSample, load_demo_model, make_demo_samples
from pytorch_grad_cam_vlm.clip import CLIPWrapper
from pytorch_grad_cam_vlm.localization import (auto_layer, energy_in_box, localization_table, occlusion_map,
                                               pointing_hit)
from pytorch_grad_cam_vlm.qwen_vl import QwenVLWrapper, patchify
from pytorch_grad_cam_vlm.shapley_cam import ShapleyCAM
from pytorch_grad_cam_vlm.smooth_grad import (SmoothEigenCAM, SmoothEigenGradCAM, SmoothFullGrad, SmoothGrad,
                                              SmoothGradCAM, SmoothGradCAMElementWise, SmoothGradCAMPlusPlus,
                                              SmoothHiResCAM, SmoothLayerCAM, SmoothScoreCAM, SmoothShapleyCAM,
                                              SmoothXGradCAM, smooth)
from pytorch_grad_cam_vlm.sweep import LayerSweep, layer_sweep, select_layers
from pytorch_grad_cam_vlm.targets import AnswerTarget, ContrastiveTarget, WordTarget
from pytorch_grad_cam_vlm.tiny import build_tiny_model
from pytorch_grad_cam_vlm.tiny_clip import build_tiny_clip

__all__ = [
    "AnswerTarget", "AttentionMap", "AttentionRollout", "CLIPWrapper", "ContrastiveTarget", "DemoSample",
    "GeneratedExplanation", "LayerSweep", "auto_layer", "energy_in_box", "layer_sweep", "load_demo_model",
    "localization_table", "make_demo_samples", "occlusion_map", "pointing_hit", "select_layers",
    "QwenVLWrapper", "ShapleyCAM", "SmoothEigenCAM", "SmoothEigenGradCAM", "SmoothFullGrad", "SmoothGrad",
    "SmoothGradCAM", "SmoothGradCAMElementWise", "SmoothGradCAMPlusPlus", "SmoothHiResCAM", "SmoothLayerCAM",
    "SmoothScoreCAM", "SmoothShapleyCAM", "SmoothXGradCAM", "TokenAblationLayer", "WordTarget", "build_tiny_clip",
    "build_tiny_model", "explain_generated", "patchify", "plot_per_token", "smooth",
]
__version__ = "0.1.0"
