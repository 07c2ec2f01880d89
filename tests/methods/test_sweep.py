"""One-pass layer sweeps equal single-layer calls; named layer choices."""
import numpy as np
import pytest
import torch
from conftest import model_state, random_image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.layers import has_projector, layer_modules, layer_name
from pytorch_grad_cam_vlm.methods.sweep import LayerSweep, layer_sweep, select_layers

LAYERS = [0, 1, 2]  # every decoder layer of the tiny model but the last


@pytest.fixture
def wrapper(qwen_wrapper):
    """The tiny Qwen2.5-VL's wrapper on each device (conftest's ``device``): every sweep here runs on each."""
    return qwen_wrapper


@pytest.fixture
def image(wrapper):
    return wrapper.preprocess(random_image(56, 84, seed=3))


@pytest.fixture
def target(wrapper, image):
    with torch.no_grad():
        return [ClassifierOutputTarget(int(wrapper(image).argmax()))]


def single_layer_maps(method, wrapper, image, target, layers=LAYERS, call=None, **kwargs):
    maps = []
    for i in layers:
        with method(model=wrapper, target_layers=[wrapper.decoder_layers[i]],
                    reshape_transform=wrapper.reshape_transform, **kwargs) as cam:
            maps.append(cam(image, target, **(call or {}))[0])
    return np.stack(maps)


def sweep_maps(method, wrapper, image, target, layers=LAYERS, call=None, **kwargs):
    with layer_sweep(method)(model=wrapper, target_layers=[wrapper.decoder_layers[i] for i in layers],
                             reshape_transform=wrapper.reshape_transform, **kwargs) as cam:
        return cam(image, target, **(call or {}))


@pytest.mark.parametrize("method", [GradCAM, HiResCAM, GradCAMPlusPlus, LayerCAM, XGradCAM, EigenCAM])
def test_sweep_equals_single_layer_calls(method, wrapper, image, target):
    maps = sweep_maps(method, wrapper, image, target)
    assert maps.shape == (1, len(LAYERS), 56, 84)
    expected = single_layer_maps(method, wrapper, image, target)
    np.testing.assert_allclose(maps[0], expected, atol=1e-5)
    # the layers' maps differ, so the comparison above tells layers apart
    assert max(np.abs(expected[i] - expected[j]).max() for i in range(3) for j in range(i)) > 0.1


def test_sweep_runs_the_model_once_and_leaves_it_as_it_was(wrapper, image, target):
    before = model_state(wrapper.model)
    calls = []
    handle = wrapper.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        sweep_maps(GradCAM, wrapper, image, target)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert model_state(wrapper.model) == before


def test_methods_that_read_one_pass_share_it(wrapper, image, target):
    """GradCAM++'s sweep pass serves GradCAMElementWise, GradCAM, HiResCAM, LayerCAM and XGradCAM: their maps equal
    their own sweeps', and the model ran once for all six."""
    from pytorch_grad_cam import GradCAMElementWise

    layers = [wrapper.decoder_layers[i] for i in LAYERS]
    readers = [GradCAMElementWise, GradCAM, HiResCAM, LayerCAM, XGradCAM]
    expected = [sweep_maps(method, wrapper, image, target) for method in readers]
    calls = []
    handle = wrapper.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with layer_sweep(GradCAMPlusPlus)(model=wrapper, target_layers=layers,
                                          reshape_transform=wrapper.reshape_transform) as cam:
            cam(image, target)
            source = cam.last_pass()
        shared = []
        for method in readers:
            with layer_sweep(method)(model=wrapper, target_layers=layers,
                                     reshape_transform=wrapper.reshape_transform) as reader:
                shared.append(reader.maps_from(source, image, target))
    finally:
        handle.remove()
    assert len(calls) == 1
    for maps, own in zip(shared, expected):
        np.testing.assert_allclose(maps, own, atol=1e-6)
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # the methods' maps differ: each read its own way


def test_a_method_that_needs_its_own_pass_does_not_read_another(wrapper, image, target):
    from pytorch_grad_cam import RandomCAM

    from pytorch_grad_cam_vlm.methods.sweep import reads_one_pass

    layers = [wrapper.decoder_layers[i] for i in LAYERS]
    with layer_sweep(GradCAM)(model=wrapper, target_layers=layers, reshape_transform=wrapper.reshape_transform) as cam:
        cam(image, target)
        source = cam.last_pass()
    assert reads_one_pass(GradCAM) and reads_one_pass(layer_sweep(GradCAM)) and not reads_one_pass(EigenCAM)
    with layer_sweep(RandomCAM)(model=wrapper, target_layers=layers,
                                reshape_transform=wrapper.reshape_transform) as reader:
        with pytest.raises(ValueError, match="RandomCAMSweep cannot read GradCAMSweep's pass"):
            reader.maps_from(source, image, target)
    with layer_sweep(LayerCAM)(model=wrapper, target_layers=layers[:2],
                               reshape_transform=wrapper.reshape_transform) as reader:
        with pytest.raises(ValueError, match="same model, target layers and reshape transform"):
            reader.maps_from(source, image, target)


def test_sweep_of_smooth_method_equals_single_layer_calls(wrapper, image, target):
    from pytorch_grad_cam_vlm.methods.smooth_grad import SmoothGradCAM

    options = dict(n_samples=3, noise_level=0.2, seed=5)
    maps = sweep_maps(SmoothGradCAM, wrapper, image, target, **options)
    expected = single_layer_maps(SmoothGradCAM, wrapper, image, target, **options)
    np.testing.assert_allclose(maps[0], expected, atol=1e-5)
    # the noise is there: the smoothed maps are not GradCAM's
    assert np.abs(expected - single_layer_maps(GradCAM, wrapper, image, target)).max() > 1e-2


def test_sweep_with_aug_smooth_equals_single_layer_calls(wrapper, image, target):
    maps = sweep_maps(GradCAM, wrapper, image, target, layers=[0, 2], call=dict(aug_smooth=True))
    expected = single_layer_maps(GradCAM, wrapper, image, target, layers=[0, 2], call=dict(aug_smooth=True))
    assert maps.shape == (1, 2, 56, 84)
    np.testing.assert_allclose(maps[0], expected, atol=1e-5)
    # flipping the image back matters: without aug_smooth the maps differ
    assert np.abs(maps - sweep_maps(GradCAM, wrapper, image, target, layers=[0, 2])).max() > 1e-2


def test_sweep_refuses_layers_out_of_running_order(wrapper, image, target):
    with pytest.raises(ValueError, match=r"order the model runs them.*positions \[1, 0\]"):
        sweep_maps(GradCAM, wrapper, image, target, layers=[2, 0])


def test_sweep_refuses_a_repeated_layer(wrapper):
    with pytest.raises(ValueError, match="each target layer once"):
        layer_sweep(GradCAM)(model=wrapper, target_layers=[wrapper.decoder_layers[1]] * 2,
                             reshape_transform=wrapper.reshape_transform)


def test_sweep_refuses_several_layers_for_shapley_cam(wrapper):
    from pytorch_grad_cam_vlm.methods.shapley_cam import ShapleyCAM

    before = model_state(wrapper.model)
    with pytest.raises(ValueError, match="one target layer per call"):
        layer_sweep(ShapleyCAM)(model=wrapper, target_layers=wrapper.decoder_layers[:2],
                                reshape_transform=wrapper.reshape_transform)
    assert model_state(wrapper.model) == before  # its hooks are gone


def test_layer_sweep_builds_one_class_per_method():
    cls = layer_sweep(GradCAM)
    assert cls is layer_sweep(GradCAM) and cls.__name__ == "GradCAMSweep"
    assert cls.__mro__[1:3] == (LayerSweep, GradCAM)
    assert layer_sweep(cls) is cls
    with pytest.raises(TypeError, match="BaseCAM"):
        layer_sweep(int)


@pytest.mark.parametrize("spec, expected", [
    ("all", [0, 1, 2, 3, 4, 5, 6]), ("early", [0, 1, 2]), ("middle", [3, 4]), ("late", [5, 6]),
    ("auto", [0, 1, 2, 4, 5, 6]), ("AUTO", [0, 1, 2, 4, 5, 6]), ("5,3", [3, 5]), (" 2 , -2 ", [2, 6]), ([1, 4], [1, 4]),
    (4, [4]),
])
def test_select_layers(spec, expected):
    assert select_layers(8, spec) == expected


def test_select_layers_without_gradients_may_take_the_last_layer():
    assert select_layers(8, "all", skip_last=False) == list(range(8))
    assert select_layers(8, "7", skip_last=False) == [7]
    assert select_layers(3, "auto") == [0, 1]
    assert select_layers(2, "late") == [0]


@pytest.mark.parametrize("spec, message", [
    ("7", "last layer"), ("-1", "last layer"), ("8", "does not exist"), ("1,x", "Unknown layer choice"),
    ("", "Unknown layer choice"), ("deep", "Unknown layer choice"), ("2,2", "twice"), ([], "Unknown layer choice"),
])
def test_select_layers_refuses_bad_choices(spec, message):
    with pytest.raises(ValueError, match=message):
        select_layers(8, spec)


def test_the_projector_is_a_layer_choice_of_vision_language_models(wrapper):
    """Named first whatever its place in the list (it runs before decoder layer 0); refused where not offered."""
    assert select_layers(8, "3, Projector", projector=True) == ["projector", 3]
    assert select_layers(8, ["projector"], projector=True) == ["projector"]
    assert select_layers(8, "all", projector=True) == list(range(7))  # presets are decoder layers
    with pytest.raises(ValueError, match="names the projector, which this model or command does not offer"):
        select_layers(8, "projector,3")
    with pytest.raises(ValueError, match="names the projector twice"):
        select_layers(8, "projector,projector", projector=True)
    assert has_projector(wrapper)
    assert layer_modules(wrapper, ["projector", 1]) == [wrapper.merger, wrapper.decoder_layers[1]]
    assert [layer_name(k) for k in ("projector", 3)] == ["projector", "layer 3"]
    assert [layer_name(k, "decoder") for k in ("projector", 3)] == ["projector", "decoder layer 3"]
