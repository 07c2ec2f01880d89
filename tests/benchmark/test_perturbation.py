"""The benchmark's batched perturbation metrics (metrics/perturbation.py, metrics/road_cg.py): ROAD equal to
grad-cam's ROAD classes, deletion / insertion AUC equal to a loop written by hand, conjugate gradients equal to the
direct solver."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm.metrics.auc_protocols import canvas, protocol, removal_order
from pytorch_grad_cam_vlm.metrics.deletion_check import ranked_map
from pytorch_grad_cam_vlm.metrics.perturbation import PerturbationScorer, imputed_images, road_masks
from pytorch_grad_cam_vlm.metrics.road import FastNoisyLinearImputer, impute_linear
from pytorch_grad_cam_vlm.metrics.road_cg import impute_cg

from conftest import random_image

TOKEN = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical results need one thread count


def token_grid_map(shape, seed=0):
    """A map like a decoder layer's: one value per 28-pixel token (ties inside each), plus a ReLU'd zero region."""
    rng = np.random.default_rng(seed)
    cam = np.kron(rng.random((shape[0] // 28, shape[1] // 28)), np.ones((28, 28))).astype(np.float32)
    cam[:, :28] = 0
    return cam


@pytest.mark.parametrize("ties", ["random", "threshold"])
def test_batched_road_equals_grad_cams_road_classes(wrapper, ties):
    """Every MoRF / LeRF image of a map in batches of 3, imputed on 2 threads, equals grad-cam's ROADMostRelevantFirst
    / ROADLeastRelevantFirst (their imputer set to FastNoisyLinearImputer) called percentile after percentile from the
    same seed, clean score included (grad-cam's return_diff)."""
    x = wrapper.preprocess(random_image(56, 84))
    assert tuple(x.shape[2:]) == (56, 84)
    cam = token_grid_map((56, 84))
    road_map = ranked_map(cam, np.random.default_rng(1)) if ties == "random" else cam + 0.1
    percentiles = [20, 60]
    torch.manual_seed(3)
    expected = []
    for metric_class in (ROADMostRelevantFirst, ROADLeastRelevantFirst):
        for percentile in percentiles:
            metric = metric_class(percentile)
            metric.perturbation.imputer = FastNoisyLinearImputer()
            expected.append(metric(x, road_map[None], [ClassifierOutputTarget(TOKEN)], wrapper)[0])
    torch.manual_seed(3)
    with ThreadPoolExecutor(2) as executor:
        scorer = PerturbationScorer(wrapper, x, TOKEN, percentiles, protocol("black", steps=4), batch_size=3,
                                    executor=executor)
        scores = scorer(road_map, removal_order(cam, "random", ranked_map(cam, np.random.default_rng(1))))
    np.testing.assert_allclose(scores.morf + scores.lerf, expected, atol=1e-5, rtol=0)
    assert np.ptp(expected) > 1e-3


@pytest.mark.parametrize("deletion_canvas, insertion_canvas, score", [("blur", "black", "probability"),
                                                                       ("zeros", "rise-blur", "logit")])
def test_deletion_and_insertion_auc_equal_a_loop_by_hand(wrapper, deletion_canvas, insertion_canvas, score):
    """A canvas per curve: each curve equals a loop by hand on its own canvas."""
    x = wrapper.preprocess(random_image(56, 84, seed=2))
    ranks = ranked_map(token_grid_map((56, 84), seed=4), np.random.default_rng(0))
    steps = 5
    chosen = protocol("black", deletion_canvas, insertion_canvas, steps)
    scores = PerturbationScorer(wrapper, x, TOKEN, [50], chosen, score=score,
                                batch_size=4)(ranks, removal_order(ranks, "random", ranks))
    deleted, inserted = (canvas(x, c, wrapper.image_mean, wrapper.image_std) for c in (deletion_canvas,
                                                                                        insertion_canvas))
    order = np.argsort(-ranks.ravel())  # the most relevant pixel first
    deletion, insertion = [], []
    for k in range(steps + 1):
        removed = np.zeros(ranks.size, dtype=bool)
        removed[order[:k * ranks.size // steps]] = True
        removed = torch.from_numpy(removed.reshape(ranks.shape))
        for curve, image in ((deletion, torch.where(removed, deleted, x)), (insertion, torch.where(removed, x,
                                                                                                    inserted))):
            with torch.no_grad():
                logits = wrapper(image)[0]
            curve.append(float(torch.softmax(logits, -1)[TOKEN] if score == "probability" else logits[TOKEN]))
    area = lambda curve: sum((curve[i] + curve[i + 1]) / 2 for i in range(steps)) / steps
    np.testing.assert_allclose(scores.deletion, deletion, atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores.insertion, insertion, atol=1e-5, rtol=0)
    assert scores.deletion_auc == pytest.approx(area(deletion), abs=1e-5)
    assert scores.insertion_auc == pytest.approx(area(insertion), abs=1e-5)
    assert abs(scores.insertion_auc - scores.deletion_auc) > 1e-4


def test_cg_solves_a_wide_removed_region_in_few_iterations():
    """A smooth map's MoRF mask at percentile 10 removes one wide region (90 % of an odd-sized image): the multigrid
    preconditioner brings conjugate gradients to the direct solution within 40 iterations (plain Jacobi-preconditioned
    ones are still 0.2 off after 40)."""
    rng = np.random.default_rng(1)
    rows, columns = np.mgrid[0:63, 0:97]
    cam = np.exp(-((rows - 20) ** 2 + (columns - 60) ** 2) / 300.0).astype(np.float32)
    [mask] = road_masks(cam, [10])[:1]
    assert (mask == 0).mean() == pytest.approx(0.9, abs=0.01)
    image = rng.normal(size=(3, 63, 97)).astype(np.float32)
    grid = impute_cg(torch.from_numpy(image), torch.from_numpy(mask[None]), tol=0.0, max_iter=40)[0]
    values, unknown = impute_linear(mask, image)
    np.testing.assert_allclose(grid.reshape(3, -1)[:, unknown].numpy().T, values, atol=1e-6, rtol=0)


def test_cg_imputation_equals_the_direct_solver(device):
    """Batched conjugate gradients (the GPU's solver; here on ``device``) give the sparse LU's imputation to 1e-4,
    and on the CPU the same imputed images from the same seed (the noise is drawn alike)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(1, 3, 56, 84)).astype(np.float32))
    masks = road_masks(ranked_map(token_grid_map((56, 84)), rng), [10, 50, 90])
    grids = impute_cg(x[0].to(device), torch.from_numpy(np.stack(masks)))
    assert grids.device.type == device.type
    for grid, mask in zip(grids.cpu(), masks):
        values, unknown = impute_linear(mask, x[0].numpy())
        np.testing.assert_allclose(grid.reshape(3, -1)[:, unknown].numpy().T, values, atol=1e-4, rtol=0)
        kept = torch.from_numpy(mask).bool()
        assert torch.equal(grid[:, kept].float(), x[0][:, kept])
    if device.type == "cpu":
        images = []
        for solver in ("direct", "cg"):
            torch.manual_seed(0)
            images.append(imputed_images(x, masks, solver)())
        assert (images[0] - images[1]).abs().max() < 1e-4


def test_sparse_system_is_grad_cams_in_either_numbering():
    """The vectorised system equals grad-cam's setup_sparse_system entry for entry, in grad-cam's numbering and in
    the grid's nested-dissection numbering (the same system, rows and columns permuted); the latter is solved."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer, neighbors_weights

    from pytorch_grad_cam_vlm.metrics.road import dissection_rank, sparse_system

    rng = np.random.default_rng(5)
    image = rng.normal(size=(3, 30, 45))
    mask = np.float32(ranked_map(token_grid_map((56, 84)), rng)[:30, :45] < 0.6)
    expected_a, expected_b = NoisyLinearImputer.setup_sparse_system(mask, image, neighbors_weights)
    unknown = np.flatnonzero(mask.reshape(-1) == 0)
    a, b, pixels = sparse_system(mask, image)
    np.testing.assert_array_equal(pixels, unknown)
    np.testing.assert_array_equal(a.toarray(), expected_a.toarray())
    np.testing.assert_array_equal(b, expected_b)
    a, b, pixels = sparse_system(mask, image, rank=dissection_rank(30, 45))
    place = np.searchsorted(unknown, pixels)
    assert sorted(place) == list(range(len(unknown))) and not np.array_equal(place, np.arange(len(unknown)))
    assert (np.diff(dissection_rank(30, 45)[pixels]) > 0).all()
    np.testing.assert_array_equal(a.toarray(), expected_a.toarray()[np.ix_(place, place)])
    np.testing.assert_array_equal(b, expected_b[place])
    values, _ = impute_linear(mask, image)
    np.testing.assert_allclose(values, np.linalg.solve(expected_a.toarray(), expected_b), atol=1e-10, rtol=0)
