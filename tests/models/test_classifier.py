"""ClassifierWrapper on torchvision and timm classifiers (random weights, nothing downloaded): the automatic layer is
the documented one and its map equals upstream grad-cam's on the raw model; preprocessing equals torchvision's
presets; explain() picks among the candidate layers by the deletion check; every method runs; the CLI writes one
report row per image, checked by hand."""
import csv
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pytorch_grad_cam import (AblationCAM, EigenCAM, FullGrad, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM,
                              ScoreCAM, XGradCAM)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import model_state, random_image
from pytorch_grad_cam_vlm import ClassifierWrapper, check_maps, classify_and_explain, explain
from pytorch_grad_cam_vlm.models.classifier import build_classifier, default_processor
from pytorch_grad_cam_vlm.models.frame import center_crop_frame
from pytorch_grad_cam_vlm.visualize import overlay

SIZE = 64  # small inputs keep the tests fast; every architecture here still has a spatial last block at 64 px

# torchvision architecture -> its documented target layer (grad-cam's README and tutorials)
TORCHVISION_LAYERS = {
    "resnet18": lambda m: m.layer4[-1],
    "vgg11": lambda m: m.features[-1],
    "densenet121": lambda m: m.features[-1],  # norm5
    "mobilenet_v3_small": lambda m: m.features[-1],
    "efficientnet_b0": lambda m: m.features[-1],
    "convnext_tiny": lambda m: m.features[-1],
    "vit_b_16": lambda m: m.encoder.layers[-1].ln_1,
}
TIMM_LAYERS = {
    "resnet18": lambda m: m.layer4[-1],
    "convnext_atto": lambda m: m.stages[-1],
    "efficientnet_b0": lambda m: m.bn2,  # after the 1x1 conv_head, as torchvision's features[-1]
    "mobilenetv3_small_050": lambda m: m.blocks[-1],  # its conv_head runs after the global pool
    "vit_tiny_patch16_224": lambda m: m.blocks[-1].norm1,
}


def vit_reshape_by_hand(tokens, prefix=1):
    """grad-cam's documented ViT reshape: drop the class token, lay the patches on their square grid."""
    side = int((tokens.shape[1] - prefix) ** 0.5)
    return tokens[:, prefix:].reshape(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)


def lively(model):
    """Random weights whose logits vary (torchvision zero-initialises a ViT's head, so its maps would be blank), in
    eval mode, as a loaded classifier is."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="linear")
    return model.eval()


def torchvision_model(name, seed=0):
    torch.manual_seed(seed)
    return lively(torchvision.models.get_model(name, weights=None,
                                               **({"image_size": SIZE} if name == "vit_b_16" else {})))


def small_vit(seed=0):
    torch.manual_seed(seed)
    return lively(torchvision.models.VisionTransformer(image_size=SIZE, patch_size=16, num_layers=2, num_heads=2,
                                                       hidden_dim=32, mlp_dim=64, num_classes=10))


def assert_auto_layer_is_documented(model, documented, prefix=None, size=SIZE, **kwargs):
    """The wrapper's automatic layer is ``documented``; its GradCAM map equals upstream GradCAM on the raw model
    at that layer (the by-hand ViT reshape for ViTs), and the deletion check scores it."""
    wrapper = ClassifierWrapper(model, image_size=size, **kwargs)
    assert wrapper.target_layer is documented and wrapper.layers[-1] is documented
    x = wrapper.preprocess(random_image(80, 100, seed=1))
    assert x.shape == (1, 3, size, size)
    reshape = None if prefix is None else (lambda t: vit_reshape_by_hand(t, prefix))
    with torch.no_grad():
        ranked = model(x)[0].argsort(descending=True).tolist()
    for index in ranked[:10]:  # random weights: the top class's GradCAM may be all negative (blank); take the
        target = ClassifierOutputTarget(index)  # best-ranked class whose upstream map is not blank
        with GradCAM(model=model, target_layers=[documented], reshape_transform=reshape) as cam:
            upstream = cam(input_tensor=x, targets=[target])
        if upstream.max() > 0:
            break
    model.zero_grad(set_to_none=True)
    with GradCAM(model=wrapper, target_layers=[wrapper.target_layer],
                 reshape_transform=wrapper.reshape_transform) as cam:
        ours = cam(input_tensor=x, targets=[target])
    assert ours.max() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(ours, upstream, atol=1e-5)
    [check] = check_maps(wrapper, x, ours, target)
    assert not check.blank and np.isfinite(check.score)


@pytest.mark.parametrize("name", list(TORCHVISION_LAYERS))
def test_torchvision_auto_layer_is_the_documented_one(name):
    model = torchvision_model(name)
    assert_auto_layer_is_documented(model, TORCHVISION_LAYERS[name](model), 1 if name == "vit_b_16" else None,
                                    name=name)


@pytest.mark.parametrize("name", list(TIMM_LAYERS))
def test_timm_auto_layer_is_the_documented_one(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = lively(timm.create_model(name, pretrained=False, **({"img_size": SIZE} if "vit" in name else {})))
    assert_auto_layer_is_documented(model, TIMM_LAYERS[name](model), 1 if "vit" in name else None)


# Architectures without a features / stages / blocks sequence, read from their own child modules: (input size, the
# documented layer: the last convolutional block before the global pool). Inception needs 139 px for a spatial last
# block.
OTHER_LAYERS = {
    "timm:inception_resnet_v2": (139, lambda m: m.conv2d_7b),
    "timm:legacy_xception": (SIZE, lambda m: m.act4),
    "timm:regnety_002": (SIZE, lambda m: m.s4),
    "torchvision:inception_v3": (139, lambda m: m.Mixed_7c),
    "torchvision:regnet_y_400mf": (SIZE, lambda m: m.trunk_output),
}


@pytest.mark.parametrize("spec", list(OTHER_LAYERS))
def test_other_cnns_auto_layer_is_the_last_block(spec):
    source, name = spec.split(":")
    torch.manual_seed(0)
    if source == "timm":
        model = lively(pytest.importorskip("timm").create_model(name, pretrained=False))
    else:
        model = lively(torchvision.models.get_model(name, weights=None))
    size, documented = OTHER_LAYERS[spec]
    assert_auto_layer_is_documented(model, documented(model), size=size)


def test_channels_last_models_are_refused_with_what_to_do():
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    with pytest.raises(ValueError, match="channels-last .NHWC.; pass target layers and a reshape_transform"):
        ClassifierWrapper(model)


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "efficientnet_b0"])
def test_preprocess_equals_torchvision_presets_and_to_rgb_inverts_it(name):
    """resize 256 / 236, bilinear / bicubic, crop 224: equal to the weights' own transforms, bit for bit; to_rgb
    gives back the resized and cropped pixels."""
    import torchvision.transforms.functional as TF
    from torchvision.models import get_model_weights

    image = Image.fromarray(random_image(300, 260, seed=2))
    wrapper = ClassifierWrapper(torchvision_model("resnet18"), processor=default_processor(torch.nn.Module(), name))
    preset = get_model_weights(name).DEFAULT.transforms()
    x = wrapper.preprocess(image)
    assert torch.equal(x[0], preset(image))
    cropped = TF.center_crop(TF.resize(image, preset.resize_size, preset.interpolation, antialias=True), [224])
    np.testing.assert_allclose(wrapper.to_rgb(x)[0], np.asarray(cropped) / 255.0, atol=1e-6)


def test_explain_chooses_among_candidate_layers_by_the_check():
    """explain() on resnet18: the candidates are the four stages' last blocks, the chosen one ranks best on the
    deletion check (its total), and the last candidate's map is GradCAM at the automatic layer."""
    wrapper = ClassifierWrapper(torchvision_model("resnet18"), image_size=SIZE)
    x = wrapper.preprocess(random_image(70, 70, seed=3))
    result = explain(wrapper, x, method="GradCAM", choice="full")
    assert result.candidate_layers == [0, 1, 2, 3]
    totals = [c.total for c in result.candidate_checks[0][0]]
    assert result.layers[0] == int(np.nanargmax(totals))
    with GradCAM(model=wrapper, target_layers=[wrapper.target_layer],
                 reshape_transform=wrapper.reshape_transform) as cam:
        expected = cam(input_tensor=x, targets=result.targets)
    np.testing.assert_allclose(result.candidate_maps[0, 0, 3], expected[0], atol=1e-6)


METHODS = [GradCAM, HiResCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, EigenCAM, ScoreCAM, AblationCAM, FullGrad]


@pytest.mark.parametrize("arch", ["resnet18", "vit"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_every_method_runs_at_batch_1_and_2_and_leaves_the_model_as_it_was(arch, method):
    """A partly frozen model in train mode: each method at batch 1 and 2 on the automatic layer (FullGrad: CNNs;
    on a ViT it has no Conv2d / BatchNorm2d biases and is refused), then modes, flags and hooks as before."""
    model = torchvision_model("resnet18") if arch == "resnet18" else small_vit()
    model.train()
    next(model.parameters()).requires_grad_(False)
    wrapper = ClassifierWrapper(model, image_size=SIZE)
    before = model_state(model)
    x = wrapper.preprocess(random_image(64, 64, seed=4))
    extra = {"ablation_layer": wrapper.ablation_layer()} if method is AblationCAM else {}
    for batch in (x, torch.cat([x, x.flip(3)])):
        with method(model=wrapper, target_layers=[wrapper.target_layer], reshape_transform=wrapper.reshape_transform,
                    **extra) as cam:
            if method is FullGrad and arch == "vit":
                with pytest.raises(NotImplementedError, match="FullGrad is not supported"):
                    cam(input_tensor=batch, targets=None)
                continue
            maps = cam(input_tensor=batch, targets=None)
        assert maps.shape == (len(batch), SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
        assert np.isfinite(maps).all()
    model.zero_grad(set_to_none=True)  # FullGrad and the upstream path may fill weight gradients
    assert model_state(model) == before


def test_classify_and_explain_returns_the_prediction_and_its_map():
    model = small_vit()
    wrapper = ClassifierWrapper(model, class_names=[f"c{k}" for k in range(10)])
    image = random_image(90, 64, seed=5)
    result = classify_and_explain(wrapper, image, method="GradCAM", layers="1")
    x = wrapper.preprocess(image)
    with torch.no_grad():
        probabilities = model(x)[0].softmax(-1)
    index = int(probabilities.argmax())
    assert (result["class_index"], result["class_name"]) == (index, f"c{index}")
    assert result["confidence"] == pytest.approx(float(probabilities[index]), abs=1e-6)
    # on the 90x64 image: the input's map carried by the classifier's center crop (NaN outside it), drawn on it
    assert result["model_map"].shape == (SIZE, SIZE)
    frame = center_crop_frame((90, 64), wrapper.processor.resize_size, (SIZE, SIZE), round)
    np.testing.assert_allclose(result["map"], frame.to_image(result["model_map"]), atol=1e-6)
    assert result["map"].shape == (90, 64) and np.array_equal(np.isnan(result["map"]), ~frame.seen)
    assert np.isnan(result["map"]).any()  # the 64-px crop of the 102x73 resize leaves a border unseen
    np.testing.assert_array_equal(result["overlay"], overlay(image / np.float32(255), result["map"]))
    assert result["overlay"].dtype == np.uint8 and result["layer"] == 1


# ------------------------------------------------------------------------------------------- CLI
def write_inputs(tmp_path):
    """Three images, a 3-class resnet18's weights as .pth and .safetensors, and its class names."""
    from safetensors.torch import save_file

    folder = tmp_path / "images"
    folder.mkdir()
    for k, size in enumerate([(80, 60), (64, 64), (50, 90)]):
        Image.fromarray(random_image(*size, seed=10 + k)).save(folder / f"img{k}.png")
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None, num_classes=3).state_dict()
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    return folder, state


def test_cli_folder_writes_overlays_and_a_report_checked_by_hand(tmp_path, capsys):
    from pytorch_grad_cam_vlm.cli import main
    from pytorch_grad_cam_vlm.metrics.deletion_check import check_maps as check

    folder, state = write_inputs(tmp_path)
    out = tmp_path / "out"
    common = ["explain", "--model", "torchvision:resnet18", "--image", str(folder), "--classes",
              str(tmp_path / "classes.txt"), "--method", "GradCAM", "--layers", "3"]
    assert main(common + ["--weights", str(tmp_path / "w.pth"), "--out", str(out)]) == 0, capsys.readouterr()
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [str(folder / f"img{k}.png") for k in range(3)]
    assert all((out / r["map"]).is_file() and (out / r["overlay"]).is_file() for r in rows)
    # image 0 by hand: torchvision's preset, the model's softmax, upstream GradCAM at layer4[-1], the check
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    model.load_state_dict(state)
    preset = torchvision.models.get_model_weights("resnet18").DEFAULT.transforms()
    x = preset(Image.open(folder / "img0.png").convert("RGB"))[None]
    with torch.no_grad():
        probabilities = model(x)[0].softmax(-1)
    index = int(probabilities.argmax())
    row = rows[0]
    assert (int(row["class_index"]), row["class_name"]) == (index, ["cat", "dog", "bird"][index])
    assert float(row["confidence"]) == pytest.approx(float(probabilities[index]), abs=1e-6)
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        expected = cam(input_tensor=x, targets=[ClassifierOutputTarget(index)])[0]
    on_image = center_crop_frame((80, 60), preset.resize_size[0], tuple(preset.crop_size * 2), round).to_image(expected)
    np.testing.assert_allclose(np.load(out / row["map"]), on_image, atol=1e-5)  # on the 80x60 image, NaN outside
    assert np.asarray(Image.open(out / row["overlay"])).shape == (80, 60, 3)
    [by_hand] = check(ClassifierWrapper(model, name="resnet18"), x, expected, ClassifierOutputTarget(index))
    assert float(row["check"]) == pytest.approx(by_hand.score, abs=1e-4) and row["verdict"] == by_hand.verdict
    # the same weights from safetensors give the same report
    again = tmp_path / "again"
    assert main(common + ["--weights", str(tmp_path / "w.safetensors"), "--out", str(again)]) == 0
    assert json.loads((again / "report.json").read_text()) == json.loads((out / "report.json").read_text())


def test_cli_refuses_random_weights_unless_asked(tmp_path, capsys):
    from pytorch_grad_cam_vlm.cli import main

    image = tmp_path / "a.png"
    Image.fromarray(random_image(40, 40)).save(image)
    args = ["explain", "--model", "torchvision:resnet18", "--image", str(image), "--method", "GradCAM",
            "--layers", "3"]
    assert main(args + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs --weights PATH" in err and "--random-weights" in err
    assert not (tmp_path / "o").exists()
    assert main(args + ["--random-weights", "--out", str(tmp_path / "r")]) == 0
    with pytest.raises(ValueError, match="2 class names for a model with 3 outputs"):
        ClassifierWrapper(build_classifier("torchvision:resnet18", random_weights=True, num_classes=3)[0],
                          class_names=["a", "b"])
