"""Visual explanations for vision-language models with the methods of pytorch-grad-cam."""
from pytorch_grad_cam_vlm.ablation import TokenAblationLayer
from pytorch_grad_cam_vlm.qwen_vl import QwenVLWrapper, patchify
from pytorch_grad_cam_vlm.shapley_cam import ShapleyCAM
from pytorch_grad_cam_vlm.tiny import build_tiny_model

__all__ = ["QwenVLWrapper", "ShapleyCAM", "TokenAblationLayer", "build_tiny_model", "patchify"]
__version__ = "0.1.0"
