"""Repeated calls leave no trace (memory, hooks, flags, modes, gradients, open files), random image sizes give maps of
the input's size or the documented error, and every subcommand is deterministic under --seed."""
import gc
import hashlib
import os
import re

import numpy as np
import pytest
from conftest import model_state, random_image
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import (QwenVLWrapper, SmoothGradCAM, explain_generated, layer_sweep, load_demo_model,
                                  make_demo_samples)
from pytorch_grad_cam_vlm.cli import main

CALLS = 200
# Resident memory may grow this much over 200 calls after warm-up: allocator noise, not a leak (a leaked graph or
# activation of the demo model is ~1 MiB per call, so a leak would show as 200 MiB).
RSS_GROWTH_MIB = 40


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1)) / 1024


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def demo():
    model, processor = load_demo_model()
    sample = make_demo_samples(1, seed=3)[0]
    wrapper = QwenVLWrapper(model, processor, sample.prompt)
    return wrapper, wrapper.preprocess(sample.image), processor.tokenizer.convert_tokens_to_ids(sample.answer)


def calls(wrapper, x, token):
    """name -> one call of each kind the soak test repeats."""
    target = [ClassifierOutputTarget(token)]
    layers = wrapper.decoder_layers[:3]
    answered = QwenVLWrapper(wrapper.model, wrapper.processor, wrapper.prompt, answer=wrapper.processor.tokenizer
                             .convert_ids_to_tokens(token))

    def gradcam():
        with GradCAM(model=wrapper, target_layers=[layers[0]], reshape_transform=wrapper.reshape_transform) as cam:
            return cam(x, target)

    def smooth():
        with SmoothGradCAM(model=wrapper, target_layers=[layers[0]], reshape_transform=wrapper.reshape_transform,
                           n_samples=2, seed=0) as cam:
            return cam(x, target)

    def sweep():
        with layer_sweep(GradCAM)(model=wrapper, target_layers=layers,
                                  reshape_transform=wrapper.reshape_transform) as cam:
            return cam(x, target)

    def answer():
        with GradCAM(model=answered, target_layers=[layers[1]], reshape_transform=answered.reshape_transform) as cam:
            return cam(x, None)

    def generated():
        return explain_generated(wrapper, x, [layers[0]], max_new_tokens=2).maps

    return dict(gradcam=gradcam, smooth=smooth, sweep=sweep, answer=answer, generated=generated)


@pytest.mark.parametrize("name", ["gradcam", "smooth", "sweep", "answer", "generated"])
def test_two_hundred_calls_leave_no_trace(demo, name):
    wrapper, x, token = demo
    call = calls(wrapper, x, token)[name]
    state = model_state(wrapper.model)
    first = call()
    for _ in range(10):  # warm-up: allocator pools, lazy caches
        call()
    gc.collect()
    rss, files = resident_mib(), open_files()
    for _ in range(CALLS):
        last = call()
    gc.collect()
    assert resident_mib() - rss < RSS_GROWTH_MIB
    assert open_files() <= files
    assert model_state(wrapper.model) == state
    np.testing.assert_allclose(last, first, atol=1e-6)


def test_random_sizes_give_maps_of_the_input_size_or_the_documented_error(wrapper):
    rng = np.random.default_rng(0)
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        refused = 0
        for _ in range(200):
            height = int(rng.integers(1, 400))
            width = max(1, int(height * np.exp(rng.uniform(-6, 6))))
            width = min(width, 3000)
            image = random_image(height, width, seed=int(rng.integers(1 << 30)))
            if max(height, width) > 200 * min(height, width):
                with pytest.raises(ValueError, match="aspect ratio"):
                    wrapper.preprocess(image)
                refused += 1
                continue
            x = wrapper.preprocess(image)
            maps = cam(x, [ClassifierOutputTarget(1)])
            assert maps.shape == (1,) + tuple(x.shape[2:])
            assert x.shape[2] % 28 == 0 and x.shape[3] % 28 == 0
            assert np.isfinite(maps).all() and 0 <= maps.min() and maps.max() <= 1
    assert 0 < refused < 200


def digest(folder, names):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest() for name in names}


def test_every_subcommand_is_deterministic_under_seed(tmp_path, capsys):
    sample = make_demo_samples(1, seed=5)[0]
    Image.fromarray(sample.image).save(tmp_path / "image.png")
    from pytorch_grad_cam_vlm.benchmark.data import write_demo_dataset

    data = write_demo_dataset(str(tmp_path / "data"), 2, seed=1)
    runs = {
        "explain": ["explain", "--model", "demo", "--image", tmp_path / "image.png", "--prompt", sample.prompt,
                    "--method", "SmoothGradCAM", "--n-samples", "3", "--seed", "7", "--mode", "grid"],
        "explain-auto": ["explain", "--model", "demo", "--image", tmp_path / "image.png", "--prompt", sample.prompt,
                         "--seed", "7"],
        "demo": ["demo", "--n", "2", "--figures", "1", "--seed", "7"],
        "benchmark": ["benchmark", "--model", "demo", "--data", data, "--layers", "0", "--percentiles", "50",
                      "--no-sanity", "--seed", "7"],
    }
    for name, argv in runs.items():
        outputs = []
        for attempt in ("a", "b"):
            out = tmp_path / f"{name}_{attempt}"
            assert main([str(a) for a in argv] + ["--out", str(out)]) == 0
            # Reports and raw maps; the demo's localization table holds timings, and figures embed nothing random
            # but are compared through the maps they draw.
            names = sorted(n for n in os.listdir(out) if n.endswith((".npy", ".json", ".csv"))
                           and not n.startswith("localization_table") and n != "settings.json")
            outputs.append(digest(out, names))
        assert outputs[0] == outputs[1] and outputs[0], name
    capsys.readouterr()
