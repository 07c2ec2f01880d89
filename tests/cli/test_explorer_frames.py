"""The explorer draws and saves maps on the uploaded picture, as the CLI does (docs/frames.md): on a 150x100 picture,
which the demo model's Qwen layout stretches onto an 84x112 input, its map, overlay, strip and token maps have the
picture's size and equal the CLI's (1e-5, the overlay pixel for pixel) and grad-cam's map on the input carried onto
the picture (1e-5). Page logic only, no server."""
import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.cli import main
from pytorch_grad_cam_vlm.cli.explorer import Explorer, Request, explain_request
from pytorch_grad_cam_vlm.cli.explorer_views import heatmap_figure
from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples
from pytorch_grad_cam_vlm.methods.answers import explain_generated
from pytorch_grad_cam_vlm.models.frame import ImageFrame
from pytorch_grad_cam_vlm.visualize import heatmap

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE = make_demo_samples(1, seed=0, split="test")[0]
HEIGHT, WIDTH = 100, 150


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("picture") / "wide.png"
    Image.fromarray(SAMPLE.image).resize((WIDTH, HEIGHT)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    return Explorer(*load_demo_model(), "qwen2_5_vl", "demo", str(tmp_path_factory.mktemp("work")))


def only(files, suffix):
    (path,) = [f for f in files if f.endswith(suffix)]
    return path


def test_map_overlay_and_strip_lie_on_the_picture_as_the_cli_draws_them(explorer, picture, tmp_path, capsys):
    result = explain_request(explorer, Request(picture, SAMPLE.prompt, method="GradCAM", layer=1))
    assert main(["explain", "--model", "demo", "--image", picture, "--prompt", SAMPLE.prompt, "--method", "GradCAM",
                 "--layers", "1", "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    cli_map = np.load(tmp_path / "cli" / "wide_GradCAM_maps.npy")
    assert cli_map.shape == (1, HEIGHT, WIDTH)
    np.testing.assert_allclose(np.load(only(result["files"], "_map.npy")), cli_map, atol=1e-5)
    cli_overlay = np.asarray(Image.open(tmp_path / "cli" / "wide_GradCAM_layer1_overlay.png").convert("RGB"))
    for shown in (result["overlay"], np.asarray(Image.open(only(result["files"], "_overlay.png")).convert("RGB"))):
        assert np.array_equal(shown, cli_overlay)
    # grad-cam on the model's input, carried onto the picture by the Qwen layout's plain resize
    wrapper = explorer.subject(SAMPLE.prompt).wrapper
    x = wrapper.preprocess(picture)
    assert tuple(x.shape[2:]) == (84, 112)
    with torch.no_grad():
        target = ClassifierOutputTarget(int(wrapper(x)[0].argmax()))
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        reference = cam(input_tensor=x, targets=[target])[0]
    frame = ImageFrame.resized((HEIGHT, WIDTH), (84, 112))
    np.testing.assert_allclose(result["map"], frame.to_image(reference), atol=1e-5)
    assert result["rgb"].shape == (HEIGHT, WIDTH, 3)
    assert result["strip_maps"].shape == (3, HEIGHT, WIDTH)  # decoder layers 0..2, each on the picture
    np.testing.assert_allclose(result["strip_maps"][1], result["map"], atol=1e-6)


def test_token_maps_lie_on_the_picture_as_the_cli_saves_them(explorer, picture, tmp_path, capsys):
    result = explain_request(explorer, Request(picture, SAMPLE.prompt, method="GradCAM", layer=1, per_token=True,
                                               max_new_tokens=4))
    assert main(["explain", "--model", "demo", "--image", picture, "--prompt", SAMPLE.prompt, "--method", "GradCAM",
                 "--layers", "1", "--per-token", "--max-new-tokens", "4", "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    cli_tokens = np.load(tmp_path / "cli" / "wide_GradCAM_per_token.npy")
    assert cli_tokens.shape == (len(result["tokens"]), HEIGHT, WIDTH) == result["token_maps"].shape
    np.testing.assert_allclose(np.load(only(result["files"], "_per_token.npy")), cli_tokens, atol=1e-5)
    wrapper = explorer.subject(SAMPLE.prompt).wrapper
    x = wrapper.preprocess(picture)
    on_input = explain_generated(wrapper, x, [wrapper.decoder_layers[1]], max_new_tokens=4)  # the input's frame
    np.testing.assert_allclose(result["token_maps"],
                               ImageFrame.resized((HEIGHT, WIDTH), tuple(x.shape[2:])).to_image(on_input.maps),
                               atol=1e-5)
    assert result["map"].shape == (HEIGHT, WIDTH)


def test_heatmap_figure_hatches_what_the_model_did_not_see():
    rgb = np.random.RandomState(0).rand(20, 30, 3).astype(np.float32)
    cam = np.tile(np.linspace(0, 1, 30, dtype=np.float32), (20, 1))
    cam[:, :5] = np.nan  # outside a crop
    figure = heatmap_figure(cam, "GradCAM", rgb)
    axes = figure.axes[0]
    assert np.array_equal(axes.images[0].get_array(), heatmap(rgb, cam)) and axes.get_title() == "GradCAM"
    assert heatmap_figure(np.where(np.isnan(cam), np.nan, 0), "x", rgb).axes[0].get_title() == "x · blank"
