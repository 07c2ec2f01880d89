"""How far placing OneVision's downsampled tile tokens by the model's own mixing weights (``anyres.unmix``, the
transpose of its bilinear downsampling) moves a map from upsampling the small grid (bilinear, what the wrapper did
before): the same GradCAM and GradCAM++ maps of the ``"tiles"`` view at every usable decoder layer of the tiny
OneVision model (models/tiny/llava.py: 4x4 tiles of 4x4 tokens, anyres_max_9), on pictures that it downsamples,
both on [0, 1] as grad-cam scales them; the largest absolute difference per map.

    python benchmarks/onevision_unmix.py            # [seeds]
Results: docs/frames.md ("Where the model mixes cells").
"""
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

from pytorch_grad_cam_vlm import LlavaWrapper, build_tiny_llava
from pytorch_grad_cam_vlm.models import anyres


def maps(wrapper, x, layer, method):
    with method(model=wrapper, target_layers=[wrapper.decoder_layers[layer]],
                reshape_transform=wrapper.reshape_transform) as cam:
        return cam(input_tensor=x, targets=None)[0]


def main(seeds: int = 4) -> None:
    rng = np.random.default_rng(0)
    model, processor = build_tiny_llava(tempfile.mkdtemp(), family="llava_onevision", seed=0)
    wrapper = LlavaWrapper(model, processor, prompt="What shape is it?", view="tiles")
    transpose = anyres.unmix
    upsample = lambda grid, size: F.interpolate(grid, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    worst = []
    for seed in range(seeds):
        size = (int(rng.integers(110, 140)), int(rng.integers(110, 140)))
        picture = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        x = wrapper.preprocess(picture)
        layout = wrapper.layout_for(*x.shape[2:])
        assert layout.packed != layout.unpadded[2:], "this picture is not downsampled"
        for method in (GradCAM, GradCAMPlusPlus):
            for layer in range(len(wrapper.decoder_layers) - 1):
                anyres.unmix = transpose
                mixed = maps(wrapper, x, layer, method)
                anyres.unmix = upsample
                upsampled = maps(wrapper, x, layer, method)
                anyres.unmix = transpose
                worst.append(float(np.abs(mixed - upsampled).max()))
                print(f"{size} {layout.unpadded[2:]} -> {layout.packed} {method.__name__} layer {layer}: "
                      f"max |difference| {worst[-1]:.3f}")
    print(f"over {len(worst)} maps: median {np.median(worst):.3f}, max {max(worst):.3f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main(*(int(a) for a in sys.argv[1:]))
