"""SmoothGrad twins of grad-cam methods: equal to the base method without noise, to the mean of the base method over
the same noisy copies with noise, independent of the batching, reproducible, and leaving the model as it was."""
import gc
import tracemalloc

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import (EigenCAM, EigenGradCAM, FullGrad, GradCAM, GradCAMElementWise, GradCAMPlusPlus,
                              HiResCAM, LayerCAM, ScoreCAM, XGradCAM)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from conftest import assert_same_map, model_state, random_image
from pytorch_grad_cam_vlm import ShapleyCAM
from pytorch_grad_cam_vlm.methods import noise as noise_module
from pytorch_grad_cam_vlm.methods.noise import NOISE_KINDS, noise_draws
from pytorch_grad_cam_vlm.methods.smooth_grad import (SmoothEigenCAM, SmoothEigenGradCAM, SmoothFullGrad,
                                              SmoothGrad, SmoothGradCAM, SmoothGradCAMElementWise,
                                              SmoothGradCAMPlusPlus, SmoothHiResCAM, SmoothLayerCAM, SmoothScoreCAM,
                                              SmoothShapleyCAM, SmoothXGradCAM, smooth)

TWINS = [(SmoothGradCAM, GradCAM), (SmoothHiResCAM, HiResCAM), (SmoothGradCAMPlusPlus, GradCAMPlusPlus),
         (SmoothXGradCAM, XGradCAM), (SmoothLayerCAM, LayerCAM), (SmoothEigenGradCAM, EigenGradCAM),
         (SmoothGradCAMElementWise, GradCAMElementWise), (SmoothScoreCAM, ScoreCAM), (SmoothEigenCAM, EigenCAM),
         (SmoothShapleyCAM, ShapleyCAM), (SmoothFullGrad, FullGrad)]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


@pytest.fixture(scope="module")
def resnet64(resnet):
    """The same network in float64, where batched and one-at-a-time convolutions agree to the last bit."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).double().eval()


def cnn_case(resnet, batch=1, size=64):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(next(resnet.parameters()).device)
    return dict(model=resnet, target_layers=[resnet.layer1[-1]]), x  # 64 channels: ScoreCAM stays quick


def qwen_case(wrapper, batch=1):
    x = wrapper.preprocess(random_image(56, 84))
    x = torch.cat([x, x.flip(-1)])[:batch]
    kwargs = dict(model=wrapper, target_layers=[wrapper.decoder_layers[1]], reshape_transform=wrapper.reshape_transform)
    return kwargs, x


def clean_targets(model, x):
    with torch.no_grad():
        return [ClassifierOutputTarget(int(c)) for c in model(x).argmax(-1)]


def noisy_copies(x, n_samples, noise_level, seed, noise="iid"):
    """The documented noise: copy s of input i is x[i] + noise_level * (max - min of x[i]) * randn, drawn in (i, s)
    order from a CPU generator seeded with `seed`; another `noise` kind draws input i's n_samples standard normals
    with `noise_draws`, input after input, from that generator."""
    generator = torch.Generator().manual_seed(seed)
    if noise != "iid":
        return [[x[i] + noise_level * (x[i].max() - x[i].min()) * e.to(x)
                 for e in noise_draws(noise, n_samples, x.shape[1:], generator)] for i in range(x.shape[0])]
    return [[x[i] + noise_level * (x[i].max() - x[i].min()) * torch.randn(x.shape[1:], generator=generator).to(x)
             for _ in range(n_samples)] for i in range(x.shape[0])]


def per_layer_maps(base_cls, kwargs, copies, target):
    """grad-cam's per-layer maps (`compute_cam_per_layer`) of each copy, (n, L, H, W); FullGrad has one array."""
    cam = type("PerLayer", (base_cls,), {"aggregate_multi_layers": lambda self, per_layer: per_layer})(**kwargs)
    maps = [cam(copy[None], [target]) for copy in copies]
    return np.float32([(np.concatenate(m, 1) if isinstance(m, list) else m)[0] for m in maps])


def mean_of_base_maps(base_cls, kwargs, x, targets, n_samples, noise_level, seed, noise="iid"):
    """The base method's per-layer maps averaged over the noisy copies, then aggregated by the base method."""
    means = np.float32([per_layer_maps(base_cls, kwargs, copies, target).mean(0)
                        for copies, target in zip(noisy_copies(x, n_samples, noise_level, seed, noise), targets)])
    per_layer = means if base_cls is FullGrad else [means[:, i:i + 1] for i in range(means.shape[1])]
    return base_cls(**kwargs).aggregate_multi_layers(per_layer)


def mean_of_final_maps(base_cls, kwargs, x, targets, n_samples, noise_level, seed):
    """The loop a user writes today: the base method's final map on each noisy copy, averaged."""
    cam = base_cls(**kwargs)
    maps = [np.mean([cam(copy[None], [target])[0] for copy in copies], axis=0)
            for copies, target in zip(noisy_copies(x, n_samples, noise_level, seed), targets)]
    return scale_cam_image(np.float32(maps))


# ------------------------------------------------------------------------------------------------ every twin
@pytest.mark.parametrize("smooth_cls, base_cls", TWINS, ids=[t[1].__name__ for t in TWINS])
@pytest.mark.parametrize("model_kind", ["qwen", "cnn"])
def test_twin_without_noise_is_the_base_map_and_with_noise_the_mean_over_copies(smooth_cls, base_cls, model_kind,
                                                                                qwen_wrapper, resnet, device,
                                                                                to_device):
    resnet = to_device(resnet, device)
    kwargs, x = qwen_case(qwen_wrapper) if model_kind == "qwen" else cnn_case(resnet)
    if base_cls is FullGrad and model_kind == "qwen":
        with pytest.raises(NotImplementedError, match="FullGrad is not supported"):
            smooth_cls(**kwargs, noise_level=0)(x, None)
        return
    model = kwargs["model"].model if model_kind == "qwen" else resnet
    before = model_state(model)
    base = base_cls(**kwargs)(x, None)
    no_noise = smooth_cls(**kwargs, noise_level=0)(x, None)
    assert_same_map(no_noise, base, device)

    targets = clean_targets(kwargs["model"], x)
    smoothed = smooth_cls(**kwargs, n_samples=2, noise_level=0.2, seed=3)(x, None)
    expected = mean_of_base_maps(base_cls, kwargs, x, targets, 2, 0.2, 3)
    assert smoothed.dtype == np.float32 and smoothed.shape == base.shape
    np.testing.assert_allclose(smoothed, expected, atol=1e-4)
    assert np.abs(smoothed - base).max() > 1e-3  # the noise changed the map
    model.zero_grad(set_to_none=True)  # grad-cam's own base method leaves weight gradients behind
    assert model_state(model) == before


def test_close_to_the_loop_a_user_writes(resnet):
    """The user's loop averages final maps, which grad-cam renormalises once more after its resize: a small
    difference."""
    kwargs, x = cnn_case(resnet)
    targets = clean_targets(resnet, x)
    smoothed = SmoothGradCAM(**kwargs, n_samples=4, seed=0)(x, targets)
    np.testing.assert_allclose(smoothed, mean_of_final_maps(GradCAM, kwargs, x, targets, 4, 0.15, 0), atol=0.02)


def test_road_scores_a_smoothed_map_like_a_base_map(resnet):
    kwargs, x = cnn_case(resnet, batch=2)
    targets = clean_targets(resnet, x)
    smoothed = SmoothGradCAM(**kwargs, n_samples=2, seed=0)(x, targets)
    assert smoothed.dtype == np.float32 and smoothed.min() == 0 and np.allclose(smoothed.max((1, 2)), 1, atol=1e-6)
    road = ROADMostRelevantFirst(percentile=50)
    torch.manual_seed(0)  # the imputer adds noise
    scores = road(x, smoothed, targets, resnet)
    torch.manual_seed(0)
    same_map_as_float64 = road(x, smoothed.astype(np.float64), targets, resnet)
    assert scores.shape == (2,) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, same_map_as_float64, atol=1e-5)


# ------------------------------------------------------------------------------------------------ drop-in swap
@pytest.mark.parametrize("call", [dict(aug_smooth=True), dict(eigen_smooth=True), dict(layers=2), dict(batch=2)],
                         ids=["aug_smooth", "eigen_smooth", "two_layers", "batch_of_2"])
def test_drop_in_options_without_noise_match_gradcam(wrapper, call):
    kwargs, x = qwen_case(wrapper, batch=call.get("batch", 1))
    if call.get("layers") == 2:
        kwargs["target_layers"] = [wrapper.vision_blocks[2], wrapper.decoder_layers[1]]
    options = {k: v for k, v in call.items() if k in ("aug_smooth", "eigen_smooth")}
    expected = GradCAM(**kwargs)(x, None, **options)
    with SmoothGradCAM(**kwargs, noise_level=0, batch_size=2) as cam:
        np.testing.assert_array_equal(cam(x, None, **options), expected)


def test_targets_none_explains_the_clean_prediction(wrapper):
    kwargs, x = qwen_case(wrapper, batch=2)
    cam = SmoothGradCAM(**kwargs, n_samples=3, noise_level=0.5, seed=0)
    resolved = cam(x, None)
    with torch.no_grad():
        clean = wrapper(x)
    torch.testing.assert_close(cam.outputs, clean)
    np.testing.assert_array_equal(resolved, cam(x, clean_targets(wrapper, x)))


# ------------------------------------------------------------------------------------------------ batching, seeds
@pytest.mark.parametrize("average", ["maps", "gradients"])
@pytest.mark.parametrize("model_kind", ["qwen", "cnn"])
def test_batched_equals_one_copy_at_a_time(qwen_wrapper, resnet64, model_kind, average, device, to_device):
    kwargs, x = (qwen_case(qwen_wrapper, batch=2) if model_kind == "qwen"
                 else cnn_case(to_device(resnet64, device), batch=2, size=32))
    x = x.to(next(kwargs["model"].parameters()).dtype)
    # CUDA picks its matrix-product kernels by batch size, and they round differently
    atol = 1e-5 if device.type == "cpu" else 1e-4
    one_at_a_time = SmoothGradCAMPlusPlus(**kwargs, n_samples=3, seed=0, average=average, batch_size=1)(x, None)
    for batch_size in (4, 6):  # 4 mixes copies of both inputs in one batch
        batched = SmoothGradCAMPlusPlus(**kwargs, n_samples=3, seed=0, average=average, batch_size=batch_size)
        np.testing.assert_allclose(batched(x, None), one_at_a_time, atol=atol)


def test_seed_makes_the_map_reproducible(resnet):
    kwargs, x = cnn_case(resnet)
    first = SmoothGradCAM(**kwargs, n_samples=3, seed=7)(x, None)
    np.testing.assert_array_equal(SmoothGradCAM(**kwargs, n_samples=3, seed=7)(x, None), first)
    assert np.abs(SmoothGradCAM(**kwargs, n_samples=3, seed=8)(x, None) - first).max() > 1e-2
    torch.manual_seed(5)  # without a seed, torch's global generator draws the noise
    unseeded = SmoothGradCAM(**kwargs, n_samples=3)(x, None)
    torch.manual_seed(5)
    np.testing.assert_array_equal(SmoothGradCAM(**kwargs, n_samples=3)(x, None), unseeded)


def test_spread_across_seeds_falls_as_n_samples_grows(resnet):
    kwargs, x = cnn_case(resnet, size=32)
    targets = clean_targets(resnet, x)

    def spread(n_samples):
        maps = [SmoothGradCAM(**kwargs, n_samples=n_samples, noise_level=0.3, seed=seed)(x, targets)
                for seed in range(4)]
        return np.std(maps, axis=0).mean()

    spreads = [spread(n) for n in (1, 4, 16)]
    assert spreads[0] > spreads[1] > spreads[2]
    assert spreads[2] < 0.5 * spreads[0]  # sampling error shrinks like 1/sqrt(n): 0.25 in theory


# ------------------------------------------------------------------------------------------------ noise kinds
def test_iid_noise_is_randn_copy_after_copy():
    generator = torch.Generator().manual_seed(0)
    expected = torch.stack([torch.randn(3, 4, 5, generator=generator) for _ in range(3)])
    assert torch.equal(noise_draws("iid", 3, (3, 4, 5), torch.Generator().manual_seed(0)), expected)


@pytest.mark.parametrize("n", [6, 7])
def test_antithetic_draws_come_in_exact_pairs(n):
    drawn = noise_draws("antithetic", n, (3, 4, 5), torch.Generator().manual_seed(0))
    pairs = drawn[:n - n % 2].view(n // 2, 2, 3, 4, 5)
    assert torch.equal(pairs[:, 1], -pairs[:, 0])
    assert all(not torch.equal(pairs[a, 0], pairs[b, 0]) for a in range(n // 2) for b in range(a))
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    copies = x + 0.3 * drawn
    torch.testing.assert_close(copies[0:n - 1:2] + copies[1::2], (2 * x).expand(n // 2, 3, 4, 5), rtol=0, atol=1e-6)
    if n % 2:  # the last copy is unpaired: the first half of the pair that n + 1 copies complete
        longer = noise_draws("antithetic", n + 1, (3, 4, 5), torch.Generator().manual_seed(0))
        assert torch.equal(drawn, longer[:n]) and torch.equal(longer[n], -drawn[-1])


def test_antithetic_copies_reach_the_model_in_pairs(resnet):
    kwargs, x = cnn_case(resnet, batch=2, size=32)
    seen = []
    handle = resnet.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        SmoothGradCAM(**kwargs, n_samples=4, seed=0, noise="antithetic", batch_size=3)(x, None)
    finally:
        handle.remove()
    assert [len(batch) for batch in seen] == [2, 3, 3, 2]  # the clean pass, then 8 copies in batches of 3
    copies, inputs = torch.cat(seen[1:]), x.repeat_interleave(4, dim=0)
    torch.testing.assert_close(copies[0::2] + copies[1::2], 2 * inputs[0::2], rtol=0, atol=1e-5)
    assert (copies - inputs).abs().amax(dim=(1, 2, 3)).gt(0.1).all()


def stratum_edges(n):
    """The normal quantiles of k / n, k = 0..n, the two ends at the Latin hypercube's clamp (2 ** -53, 1 - 2 ** -53),
    which lies beyond Sobol's extreme cell centres (2 ** -31, 1 - 2 ** -31)."""
    edges = torch.special.ndtri(torch.arange(n + 1, dtype=torch.float64) / n)
    edges[0], edges[-1] = torch.special.ndtri(torch.tensor([2.0 ** -53, 1 - 2.0 ** -53], dtype=torch.float64))
    return edges


def assert_stratified(drawn):
    """Each element's n values lie one in each of the n equal-probability strata of N(0, 1) (float32 rounding: 1e-5)."""
    edges = stratum_edges(drawn.shape[0])
    values = drawn.double().flatten(1).sort(dim=0).values
    assert (values >= edges[:-1, None] - 1e-5).all() and (values <= edges[1:, None] + 1e-5).all()


@pytest.mark.parametrize("shape, max_dimension", [((3, 8, 8), None), ((3, 32, 32), 256)],
                         ids=["one_dimension_per_element", "12_elements_per_dimension"])
def test_sobol_normals_are_stratified_with_mean_0_and_variance_1(monkeypatch, shape, max_dimension):
    """The tolerance. Given the Sobol points and the elements' dimensions, element j's values depend on its own
    random 30-bit digital shift alone, so the elements are independent, and each copy's value of j is the normal
    quantile of a uniform draw among the 2 ** 30 cell centres: mean exactly 0 (symmetry), second moment 1 up to the
    midpoint rule's error (below 1e-7). With n = 2 ** k copies, j's values lie one per stratum [q(k / n), q((k + 1)
    / n)], so j's mean lies in [lo, hi], the means of the strata's lower and upper edges, and its mean square in
    the same way between the strata's smallest and largest squares. Hoeffding over the M elements: the mean over all
    values lies within (hi - lo) * sqrt(ln(2 / 1e-6) / (2 M)) of 0 with probability 1 - 1e-6, and the mean square
    within its own range times that factor of 1. (n = 64; M = 192: 0.046 for the mean, 0.24 for the mean square;
    M = 3072: 0.012 and 0.060. n i.i.d. normals per element would give 0.018 and 0.025 at M = 3072 over 5 standard
    deviations: the bound is loose, the stratification test is the tight one.)"""
    if max_dimension is not None:
        monkeypatch.setattr(noise_module, "SOBOL_MAX_DIMENSION", max_dimension)
    n, elements = 64, int(np.prod(shape))
    drawn = noise_draws("sobol", n, shape, torch.Generator().manual_seed(0)).double()
    assert drawn.shape == (n,) + shape and drawn.abs().max() < 6.2  # |q(2 ** -31)| = 6.11
    assert_stratified(drawn)
    edges = stratum_edges(n).clamp(-6.2, 6.2)
    lower, upper = torch.minimum(edges[:-1] ** 2, edges[1:] ** 2), torch.maximum(edges[:-1] ** 2, edges[1:] ** 2)
    lower[n // 2 - 1:n // 2 + 1] = 0  # the two middle strata reach 0
    hoeffding = np.sqrt(np.log(2 / 1e-6) / (2 * elements))
    mean_tolerance = float(edges[1:].mean() - edges[:-1].mean()) * hoeffding
    square_tolerance = float(upper.mean() - lower.mean()) * hoeffding + 1e-7
    assert abs(float(drawn.mean())) <= mean_tolerance
    assert abs(float((drawn ** 2).mean()) - 1) <= square_tolerance
    assert abs(float(drawn.var()) - 1) <= square_tolerance + mean_tolerance ** 2


@pytest.mark.parametrize("n", [10, 64])
def test_latin_normals_are_stratified(n):
    drawn = noise_draws("latin", n, (3, 16, 16), torch.Generator().manual_seed(0))
    assert torch.isfinite(drawn).all()
    assert_stratified(drawn)
    orders = drawn.flatten(1).argsort(dim=0)
    assert len({tuple(order) for order in orders.T.tolist()}) > 0.99 * orders.shape[1]  # each element its own order


@pytest.mark.parametrize("noise", ["antithetic", "sobol", "latin"])
def test_each_noise_is_the_mean_of_the_base_maps_over_its_copies(resnet, noise):
    kwargs, x = cnn_case(resnet, batch=2, size=32)
    targets = clean_targets(resnet, x)
    smoothed = SmoothGradCAM(**kwargs, n_samples=3, seed=3, noise=noise, batch_size=4)(x, None)
    np.testing.assert_allclose(smoothed, mean_of_base_maps(GradCAM, kwargs, x, targets, 3, 0.15, 3, noise), atol=1e-4)


@pytest.mark.parametrize("average", ["maps", "gradients"])
@pytest.mark.parametrize("noise", NOISE_KINDS)
def test_each_noise_is_seeded_and_independent_of_the_batching(resnet64, noise, average):
    kwargs, x = cnn_case(resnet64, batch=2, size=32)
    x = x.double()

    def smoothed(seed, batch_size=1):
        return SmoothGradCAMPlusPlus(**kwargs, n_samples=5, seed=seed, noise=noise, average=average,
                                     batch_size=batch_size)(x, None)

    one_at_a_time = smoothed(0)
    np.testing.assert_array_equal(smoothed(0), one_at_a_time)
    assert np.abs(smoothed(1) - one_at_a_time).max() > 1e-2
    for batch_size in (4, 10):  # 4 mixes copies of both inputs in a batch, 10 takes them all at once
        np.testing.assert_allclose(smoothed(0, batch_size), one_at_a_time, atol=1e-5)
    torch.manual_seed(5)  # without a seed, torch's global generator draws the noise
    unseeded = smoothed(None, 4)
    torch.manual_seed(5)
    np.testing.assert_array_equal(smoothed(None, 4), unseeded)


@pytest.mark.parametrize("noise", NOISE_KINDS)
@pytest.mark.parametrize("model_kind", ["qwen", "cnn"])
def test_without_noise_every_kind_is_the_base_map(wrapper, resnet, model_kind, noise):
    kwargs, x = qwen_case(wrapper) if model_kind == "qwen" else cnn_case(resnet)
    np.testing.assert_array_equal(SmoothGradCAM(**kwargs, noise_level=0, noise=noise, n_samples=4)(x, None),
                                  GradCAM(**kwargs)(x, None))


def test_unknown_noise_is_refused_naming_the_kinds(resnet):
    kwargs, _ = cnn_case(resnet)
    hooks = model_state(resnet)["hooks"]
    message = r"noise must be one of \('iid', 'antithetic', 'sobol', 'latin'\), got 'gaussian'"
    with pytest.raises(ValueError, match=message):
        SmoothGradCAM(**kwargs, noise="gaussian")
    assert model_state(resnet)["hooks"] == hooks
    with pytest.raises(ValueError, match=message):
        noise_draws("gaussian", 2, (3, 4))


# ------------------------------------------------------------------------------------------------ averaging
@pytest.mark.parametrize("variant", ["smoothgrad_sq", "vargrad"])
def test_noise_tunnel_variants_against_the_per_copy_maps(resnet, variant):
    kwargs, x = cnn_case(resnet)
    targets = clean_targets(resnet, x)
    maps = per_layer_maps(GradCAM, kwargs, noisy_copies(x, 4, 0.15, 0)[0], targets[0])[:, 0]
    expected = np.mean(maps ** 2, 0) if variant == "smoothgrad_sq" else np.var(maps, 0)
    smoothed = SmoothGradCAM(**kwargs, n_samples=4, seed=0, variant=variant)(x, targets)
    np.testing.assert_allclose(smoothed, scale_cam_image(expected[None]), atol=1e-4)


def test_gradients_average_before_the_weighting(resnet):
    """Smooth Grad-CAM++ (Omeiza et al.): mean activations and gradients over the copies, then GradCAM++ once."""
    kwargs, x = cnn_case(resnet)
    targets = clean_targets(resnet, x)
    base = GradCAMPlusPlus(**kwargs)
    activations, gradients = [], []
    for copy in noisy_copies(x, 3, 0.15, 0)[0]:
        base(copy[None], targets)
        activations.append(base.activations_and_grads.activations[0].numpy())
        gradients.append(base.activations_and_grads.gradients[0].numpy())
    cam = base.get_cam_image(x, kwargs["target_layers"][0], targets, np.mean(activations, 0), np.mean(gradients, 0))
    expected = scale_cam_image(scale_cam_image(np.maximum(cam, 0), (64, 64)))
    smoothed = SmoothGradCAMPlusPlus(**kwargs, n_samples=3, seed=0, average="gradients")(x, targets)
    np.testing.assert_allclose(smoothed, expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------ contracts
class RecordingSweep:
    """The layer-sweep contract: a mixin before SmoothGrad that keeps the per-layer maps instead of their mean."""

    calls = []

    def aggregate_multi_layers(self, cam_per_target_layer):
        self.calls.append(len(cam_per_target_layer))
        return scale_cam_image(np.concatenate(cam_per_target_layer, 1)[0])[None]


def test_layer_sweep_gets_each_layer_smoothed_once_per_call(wrapper):
    kwargs, x = qwen_case(wrapper)
    layers = [wrapper.vision_blocks[2], wrapper.decoder_layers[1]]
    kwargs["target_layers"] = layers
    sweep_cls = type("SweepSmoothGradCAM", (RecordingSweep, SmoothGrad, GradCAM), {})
    maps = sweep_cls(**kwargs, n_samples=3, seed=0, batch_size=2)(x, None)
    assert RecordingSweep.calls == [2]
    for i, layer in enumerate(layers):
        single = SmoothGradCAM(**dict(kwargs, target_layers=[layer]), n_samples=3, seed=0, batch_size=2)(x, None)
        np.testing.assert_allclose(maps[:, i], single, atol=1e-5)


def test_package_layer_sweep_over_a_smooth_method(wrapper):
    sweep = pytest.importorskip("pytorch_grad_cam_vlm.methods.sweep")
    kwargs, x = qwen_case(wrapper)
    layers = [wrapper.vision_blocks[2], wrapper.decoder_layers[1]]
    with sweep.layer_sweep(SmoothGradCAM)(**dict(kwargs, target_layers=layers), n_samples=2, seed=0) as cam:
        maps = cam(x, None)
    assert maps.shape == (1, 2) + x.shape[2:]
    single = SmoothGradCAM(**dict(kwargs, target_layers=layers[1:]), n_samples=2, seed=0)(x, None)
    np.testing.assert_allclose(maps[:, 1], single, atol=1e-5)


def test_smooth_makes_a_twin_of_any_method_in_one_line(resnet):
    class NegativeGradCAM(GradCAM):  # a user's own method
        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            return -super().get_cam_weights(input_tensor, target_layer, targets, activations, grads)

    kwargs, x = cnn_case(resnet)
    twin = smooth(NegativeGradCAM)
    assert twin.__name__ == "SmoothNegativeGradCAM" and issubclass(twin, NegativeGradCAM)
    np.testing.assert_array_equal(twin(**kwargs, noise_level=0)(x, None), NegativeGradCAM(**kwargs)(x, None))
    np.testing.assert_array_equal(smooth(GradCAM)(**kwargs, n_samples=2, seed=1)(x, None),
                                  SmoothGradCAM(**kwargs, n_samples=2, seed=1)(x, None))
    with pytest.raises(TypeError, match="subclass of pytorch_grad_cam's BaseCAM"):
        smooth(torch.nn.Linear)


def test_model_unchanged_and_no_graph_below_the_target_layer(resnet):
    kwargs, x = cnn_case(resnet)
    kwargs["target_layers"] = [resnet.layer3[-1]]
    resnet.fc.weight.requires_grad_(False)  # a mix of flags, restored as they were
    cam = SmoothGradCAM(**kwargs, n_samples=2)
    resnet.train()
    before = model_state(resnet)
    below, inside = [], []
    handles = [resnet.layer2.register_forward_hook(lambda m, a, out: below.append(out.requires_grad)),
               resnet.layer4.register_forward_hook(lambda m, a, out: inside.append(out.requires_grad))]
    try:
        cam(x, None)
    finally:
        for handle in handles:
            handle.remove()
        resnet.fc.weight.requires_grad_(True)
        resnet.eval()
    assert model_state(resnet)["grads"] == 0
    assert before == dict(model_state(resnet), training=before["training"], requires_grad=before["requires_grad"])
    assert not any(below) and all(inside[1:])  # the clean pass builds no graph, the copies start it at layer3


def test_model_unchanged_on_the_qwen_wrapper(qwen, qwen_wrapper):
    model = qwen[0]
    kwargs, x = qwen_case(qwen_wrapper)
    with SmoothGradCAM(**kwargs, n_samples=2) as cam:
        before = model_state(model)
        cam(x, None)
        assert model_state(model) == before


def test_target_layers_on_parallel_branches_fall_back_to_the_whole_graph():
    class TwoBranches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.left, self.right = (torch.nn.Conv2d(3, 4, 3, padding=1),
                                                torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3))
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            h = self.stem(x)
            return self.head(torch.cat([self.left(h).mean((2, 3)), self.right(h).mean((2, 3))], 1))

    torch.manual_seed(0)
    model = TwoBranches().eval()
    x = torch.randn(1, 3, 12, 12)
    kwargs = dict(model=model, target_layers=[model.left, model.right])
    np.testing.assert_array_equal(SmoothGradCAM(**kwargs, noise_level=0)(x, None), GradCAM(**kwargs)(x, None))


def test_memory_does_not_grow_over_50_calls(wrapper):
    kwargs, x = qwen_case(wrapper)
    cam = SmoothGradCAM(**kwargs, n_samples=2, seed=0, batch_size=2)
    targets = clean_targets(wrapper, x)
    numpy_memory = [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)]

    def live():
        gc.collect()
        objects = gc.get_objects()
        return sum(issubclass(type(o), torch.Tensor) for o in objects), len(objects)

    tracemalloc.start()
    for _ in range(10):  # warm-up: first-call caches of Python and torch
        cam(x, targets)
    (tensors, objects), start = live(), tracemalloc.take_snapshot().filter_traces(numpy_memory)
    for _ in range(40):
        cam(x, targets)
    (tensors_after, objects_after), end = live(), tracemalloc.take_snapshot().filter_traces(numpy_memory)
    tracemalloc.stop()
    assert tensors_after == tensors  # no graph, activation or gradient kept from a call
    numpy_growth = sum(stat.size_diff for stat in end.compare_to(start, "filename"))
    assert numpy_growth < 19_000  # less than one map (56 x 84 float32) over 40 calls
    assert objects_after - objects < 40  # not one Python object a call


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("options, message", [
    (dict(n_samples=0), "n_samples must be a whole number >= 1"),
    (dict(noise_level=-0.1), "give a number in 0..1"), (dict(noise_level=5), "give a number in 0..1"),
    (dict(batch_size=0), "batch_size must be a whole number >= 1"),
    (dict(average="activations"), "average must be one of"),
    (dict(variant="sq"), "variant must be one of"),
    (dict(average="gradients", variant="vargrad"), "use it with average='maps'"),
])
def test_bad_options_are_refused(resnet, options, message):
    kwargs, _ = cnn_case(resnet)
    with pytest.raises(ValueError, match=message):
        SmoothGradCAM(**kwargs, **options)


def test_gradients_average_needs_a_gradient_weighting(resnet):
    kwargs, _ = cnn_case(resnet)
    hooks = model_state(resnet)["hooks"]
    with pytest.raises(ValueError, match="SmoothScoreCAM does not weight activations by their gradients"):
        SmoothScoreCAM(**kwargs, average="gradients")
    assert model_state(resnet)["hooks"] == hooks


def test_one_target_per_input(resnet):
    kwargs, x = cnn_case(resnet, batch=2)
    with pytest.raises(ValueError, match="got 1 targets for 2 inputs"):
        SmoothGradCAM(**kwargs, n_samples=2)(x, [ClassifierOutputTarget(0)])


def test_every_twin_is_a_base_cam():
    assert all(issubclass(twin, SmoothGrad) and issubclass(twin, base) and issubclass(twin, BaseCAM)
               for twin, base in TWINS)
