"""Where in the image Qwen2.5-VL looks for the next word of its answer, as overlay PNGs, with the map chosen by
measurement: every candidate method and decoder layer, each map scored by the deletion check, the best one kept.

    python usage_examples/qwen_gradcam.py --model Qwen/Qwen2.5-VL-3B-Instruct --image cat.jpg \
        --prompt "What animal is this?"
    python usage_examples/qwen_gradcam.py        # the embedded demo model on one of its held-out images, no download
    python usage_examples/qwen_gradcam.py --model demo --image photo.jpg --prompt "What shape is the red object?"

Writes ``auto_overlay.png`` (the best-checked map) and ``auto_layers.png`` (every candidate layer of the chosen
method, from one pass, each panel with its check).
"""
import argparse

import torch
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from pytorch_grad_cam_vlm import QwenVLWrapper, explain
from pytorch_grad_cam_vlm.demo import embedded_model_path, make_demo_samples
from pytorch_grad_cam_vlm.visualize import save_figure

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="demo", help="Qwen2.5-VL folder or hub id, or demo / crosses (the embedded "
                                                    "models, no download; default demo)")
parser.add_argument("--image", help="image file (default: a held-out image of the demo task, with its question)")
parser.add_argument("--prompt")
args = parser.parse_args()
if (args.image is None) != (args.prompt is None) or (args.image is None and args.model != "demo"):
    parser.error("give --image and --prompt together (only the demo model has a default image and question)")

path = embedded_model_path(args.model)  # "demo" and "crosses" are folders inside the package
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16 if torch.cuda.is_available()
                                                           else torch.float32)
model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
processor = AutoProcessor.from_pretrained(path)
if args.image is None:
    sample = make_demo_samples(1)[0]
    image, prompt = sample.image, sample.prompt
else:
    image, prompt = args.image, args.prompt

wrapper = QwenVLWrapper(model, processor, prompt=prompt)  # images (B, 3, H, W) -> next-token logits (B, vocab)
x = wrapper.preprocess(image)  # the processor's resize and normalisation, as one (1, 3, H, W) tensor
rgb = wrapper.to_rgb(x)[0]

# targets=None explains the token the model says next. Each candidate method runs one forward and one backward pass
# for all candidate layers; the deletion check scores every map in batched forward passes.
result = explain(wrapper, x, targets=None)
method, layer, check = result.methods[0], result.layers[0], result.checks[0]
token = processor.tokenizer.decode([result.targets[0].category])
Image.fromarray(show_cam_on_image(rgb, result.maps[0], use_rgb=True)).save("auto_overlay.png")
for line in result.warnings():  # a chosen map that fails the check (blank or inverted) is said so
    print("warning:", line)

m = result.candidate_methods.index(method)
checks = result.candidate_checks[0][m]
save_figure("auto_layers.png", "grid", rgb, result.candidate_maps[0, m], result.candidate_layers, method, token,
            notes=[f"check {c.score:+.3g}" for c in checks])
print(f"Next token {token!r}: {method} at layer {layer} (deletion check {check.score:+.3g}, best of "
      f"{'/'.join(result.candidate_methods)} at layers {result.candidate_layers}); wrote auto_overlay.png and "
      "auto_layers.png")
