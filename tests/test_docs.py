"""The docs cannot drift from the code: every Python block of README.md and docs/**/*.md (the site's pages and
tutorials) runs, in order, one namespace per file, and their tables of numbers equal what
benchmarks/readme_tables.py makes of the committed CSVs.

The one substitution: hub model names become local models, nothing downloaded. Qwen names become the embedded demo
model; CLIP, SigLIP and SigLIP 2 names become tiny random models of the same family (build_tiny_clip). The images
the blocks name (``image``, ``"dog.jpg"``, ...) are a demo sample, written where the blocks run; every block runs
again on a non-square photo on which ``explain`` chooses the projector (a layer that is no index).
"""
import glob
import os
import re
import sys

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pytorch_grad_cam_vlm import make_demo_samples
from pytorch_grad_cam_vlm.demo import DEMO_MODEL_DIR
from pytorch_grad_cam_vlm.models.tiny.clip import build_tiny_clip

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                          recursive=True))

IMAGE_FILES = ("image.png", "photo.jpg", "dog.jpg", "cat.jpg", "dog_and_cat.jpg")
TINY = {"openai/clip-vit-base-patch16": "clip", "openai/clip-vit-base-patch32": "clip",
        "google/siglip-base-patch16-224": "siglip", "google/siglip2-base-patch16-naflex": "siglip2"}


@pytest.fixture(scope="module")
def substitutions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("doc_models")
    names = {"Qwen/Qwen2.5-VL-3B-Instruct": DEMO_MODEL_DIR}
    for name, family in TINY.items():
        path = folder / family
        if not path.exists():
            build_tiny_clip(path, family=family)
        names[name] = str(path)
    return names


def wide_photo():
    """A held-out demo sample widened by half with background noise (112x168, the model sees 84x112): explain's
    default chooses the projector on it for README's question (test_explain_chooses_the_projector_on_the_wide_photo)."""
    sample = make_demo_samples(2, seed=0)[1]
    rng = np.random.default_rng(1)
    h, w, _ = sample.image.shape
    extra = np.clip(rng.normal(sample.image[:, :8].mean((0, 1)), 8, (h, w // 2, 3)), 0, 255).astype(np.uint8)
    return np.concatenate([sample.image, extra], 1)


PHOTOS = {"square": lambda: make_demo_samples(1, seed=0)[0].image, "wide_projector": wide_photo}


def test_explain_chooses_the_projector_on_the_wide_photo():
    from pytorch_grad_cam_vlm import QwenVLWrapper, explain, load_demo_model

    wrapper = QwenVLWrapper(*load_demo_model(), prompt="What color is the circle?")  # README's quick start
    x = wrapper.preprocess(wide_photo())
    assert x.shape[2] != x.shape[3] and explain(wrapper, x).layers[0] == "projector"


def python_blocks(path):
    with open(os.path.join(ROOT, path)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("photo", sorted(PHOTOS))
@pytest.mark.parametrize("path", [p for p in DOCS if "```python" in open(os.path.join(ROOT, p)).read()])
def test_every_python_block_runs(path, photo, substitutions, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    assert blocks, f"{path} has no Python block"
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    image = PHOTOS[photo]()
    for name in IMAGE_FILES:
        Image.fromarray(image).save(name)
    namespace = {"image": image, "__name__": "__docs__"}
    for index, block in enumerate(blocks):
        for name, local in substitutions.items():
            block = block.replace(f'"{name}"', repr(local))
        exec(compile(block, f"{path}, Python block {index + 1}", "exec"), namespace)


def test_tables_equal_the_committed_csvs():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import readme_tables
    finally:
        sys.path.pop(0)
    generated = 0
    for path in readme_tables.pages():
        with open(path) as f:
            text = f.read()
        generated += text.count("<!-- generated:")
        assert readme_tables.render(text) == text, f"run python benchmarks/readme_tables.py and commit {path}"
    assert generated >= len(readme_tables.TABLES)
