"""Grad-CAM on Qwen2.5-VL: where in the image the model looks for the next word of its answer, as overlay PNGs.

    python usage_examples/qwen_gradcam.py --model Qwen/Qwen2.5-VL-3B-Instruct --image cat.jpg \
        --prompt "What animal is this?"
    python usage_examples/qwen_gradcam.py        # the embedded demo model on one of its held-out images, no download

Writes ``gradcam_overlay.png`` (one layer) and ``gradcam_layers.png`` (every usable layer, from one pass).
"""
import argparse

import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image

from pytorch_grad_cam_vlm import QwenVLWrapper
from pytorch_grad_cam_vlm.methods.sweep import auto_layer
from pytorch_grad_cam_vlm.methods.sweep import layer_sweep, select_layers
from pytorch_grad_cam_vlm.visualize import save_figure

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="Qwen2.5-VL folder or hub id (default: the embedded demo model)")
parser.add_argument("--image")
parser.add_argument("--prompt")
args = parser.parse_args()

if args.model:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16 if
                                                                torch.cuda.is_available() else torch.float32)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    processor = AutoProcessor.from_pretrained(args.model)
    image, prompt = args.image, args.prompt
else:
    from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples

    model, processor = load_demo_model()
    sample = make_demo_samples(1)[0]
    image, prompt = sample.image, sample.prompt

wrapper = QwenVLWrapper(model, processor, prompt=prompt)  # images (B, 3, H, W) -> next-token logits (B, vocab)
x = wrapper.preprocess(image)  # the processor's resize and normalisation, as one (1, 3, H, W) tensor
rgb = wrapper.to_rgb(x)[0]

# One layer. targets=None explains the token the model says next; the last decoder layer gets no gradient.
layer = auto_layer(wrapper)
with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[layer]],
             reshape_transform=wrapper.reshape_transform) as cam:
    grayscale = cam(input_tensor=x, targets=None)[0]
    token = processor.tokenizer.decode([int(cam.outputs[0].argmax())])
Image.fromarray(show_cam_on_image(rgb, grayscale, use_rgb=True)).save("gradcam_overlay.png")

# Every usable layer from one forward and one backward pass: maps (1, L, H, W) instead of their mean.
layers = select_layers(len(wrapper.decoder_layers), "all")
with layer_sweep(GradCAM)(model=wrapper, target_layers=[wrapper.decoder_layers[i] for i in layers],
                          reshape_transform=wrapper.reshape_transform) as cam:
    maps = cam(input_tensor=x, targets=None)[0]
save_figure("gradcam_layers.png", "grid", rgb, maps, layers, "GradCAM", token)
print(f"Next token {token!r}: wrote gradcam_overlay.png (layer {layer}) and gradcam_layers.png (layers {layers})")
