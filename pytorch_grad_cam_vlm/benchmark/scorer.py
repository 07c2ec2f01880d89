"""The benchmark's scores of one sample: its map per (method, layer), ROAD, deletion / insertion, the answer change,
the pointing game and energy, the randomization checks and the GPU memory of the map, row by row
(:class:`Scorer`); :mod:`~pytorch_grad_cam_vlm.benchmark.runner` runs it over the data and writes the outputs.

Random numbers (RandomCAM's weights, ROAD's imputation noise, random tie orders) are seeded from the run's seed, the
sample's index, the method and the layer (:func:`seed_everything`), so a row does not depend on which process computes
it or on what ran before it.
"""
from __future__ import annotations

import random
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.benchmark.data import Sample, pixel_boxes
from pytorch_grad_cam_vlm.benchmark.masks import pixel_mask
from pytorch_grad_cam_vlm.benchmark.report import curve_column
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.methods.catalog import cam_options
from pytorch_grad_cam_vlm.metrics.auc_protocols import removal_order
from pytorch_grad_cam_vlm.metrics.deletion_check import ranked_map
from pytorch_grad_cam_vlm.metrics.localization import energy_in_boxes, energy_in_mask, pointing_hit, pointing_in_mask
from pytorch_grad_cam_vlm.metrics.perturbation import PerturbationScorer, PerturbationScores, make_executor
from pytorch_grad_cam_vlm.metrics.sanity import spearman
from pytorch_grad_cam_vlm.models.registry import make_subject

PHASES = {"map": 0, "road": 1}


def seed_everything(seed: int, sample: int, method: str, layer: int, phase: str) -> None:
    """Seed torch, numpy and random from the run's seed and one (sample, method, layer, phase): the same numbers
    whichever process computes the row and whatever ran before it."""
    entropy = [seed, sample, zlib.crc32(method.encode()), layer, PHASES[phase]]
    value = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


@dataclass
class SampleInputs:
    """What every row of one sample shares: the wrapped model, the image ``x``, the target, the boxes and mask
    mapped onto ``x``, the pointing tolerance in pixels and the perturbation scorer."""

    subject: object
    x: torch.Tensor
    targets: list
    boxes: list
    distractors: list
    mask: Optional[np.ndarray]
    tolerance: float
    perturb: PerturbationScorer


class PeakMemory:
    """What :func:`peak_memory` measured: ``gib``, the peak GPU memory allocated in GiB (None off CUDA)."""

    gib: Optional[float] = None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Measure the peak memory torch allocates on the CUDA ``device`` inside the block (the model's weights
    included, as a GPU's memory use is read); off CUDA nothing is measured and ``gib`` stays None."""
    measured = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield measured
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        measured.gib = torch.cuda.max_memory_allocated(device) / 2 ** 30


class Scorer:
    """Scores the rows of one sample: builds the wrappers of its prompt (trained and randomized model), its image
    and target once, then each (method, layer)."""

    def __init__(self, family: str, model, processor, methods: Dict[str, type], percentiles: Sequence[float],
                 seed: int, tolerance_px: Optional[float], randomized: Sequence[torch.nn.Module],
                 road_ties: str = "random", texts: Optional[Sequence[str]] = None, imputation_threads: int = 1,
                 **perturbation) -> None:
        """``perturbation``: the options of :class:`PerturbationScorer` (``batch_size``, ``protocol``, ``score``,
        ``solver``)."""
        self.family, self.model, self.processor, self.methods = family, model, processor, methods
        self.texts, self.imputation_threads, self.perturbation = texts, imputation_threads, perturbation
        self.percentiles, self.seed, self.tolerance_px = list(percentiles), seed, tolerance_px
        self.randomized, self.road_ties = randomized, road_ties
        self._subjects: Dict[Tuple[str, bool], object] = {}

    def subject(self, prompt: Optional[str], randomized: Optional[int] = None):
        """The CLI's wrapped model (:class:`pytorch_grad_cam_vlm.cli.Subject`) of ``prompt`` (CLIP: of the texts),
        one per prompt."""
        key = (prompt, randomized)
        if key not in self._subjects:
            model = self.model if randomized is None else self.randomized[randomized]
            self._subjects[key] = make_subject(self.family, model, self.processor, prompt, self.texts)
        return self._subjects[key]

    def target_token(self, sample: Sample, wrapper, x: torch.Tensor) -> int:
        """The first token of the answer (CLIP: the answer's index among the texts), or the class the model predicts
        on the clean image."""
        if sample.answer is not None:
            return answer_token(self.processor.tokenizer, sample, self.texts)
        with torch.no_grad():
            return int(wrapper(x)[0].argmax())

    def rows(self, sample: Sample, units: Sequence[Tuple[str, int]]) -> Iterable[dict]:
        """One row of scores per ``(method, layer)`` of ``units``, as each finishes."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        from pytorch_grad_cam_vlm.image import load_rgb

        subject = self.subject(sample.prompt)
        wrapper = subject.wrapper
        image = load_rgb(sample.image)
        x = wrapper.preprocess(image)
        cropped = getattr(self.processor.image_processor, "do_center_crop", False) and image.size[0] != image.size[1]
        cropped = cropped and not hasattr(wrapper, "input_boxes")  # LLaVA maps boxes itself (canvas, crop)
        if cropped and (sample.boxes or sample.distractor_boxes or sample.masks):
            raise InputError(f"{sample.where}: the processor center-crops this {image.size[0]}x{image.size[1]} image, "
                             "so its boxes cannot be mapped onto the map; use square images for CLIP models.")
        scale_x, scale_y = x.shape[3] / image.size[0], x.shape[2] / image.size[1]
        boxes = pixel_boxes(sample.boxes, scale_x, scale_y)
        distractors = pixel_boxes(sample.distractor_boxes, scale_x, scale_y)
        if hasattr(wrapper, "input_boxes"):  # anyres: the picture lies letterboxed in the canvas
            boxes, distractors = (wrapper.input_boxes(b, image.size[::-1]) for b in (sample.boxes,
                                                                                       sample.distractor_boxes))
        if sample.masks and hasattr(wrapper, "input_boxes"):
            raise InputError(f"{sample.where}: masks cannot be mapped onto this model's anyres canvas; use boxes.")
        mask = pixel_mask(sample.masks, image.size, tuple(x.shape[2:]), sample.where) if sample.masks else None
        tolerance = self.tolerance_px if self.tolerance_px is not None else wrapper.token_cell / 2
        token = self.target_token(sample, wrapper, x)
        executor = make_executor(self.imputation_threads)
        with executor or nullcontext():
            inputs = SampleInputs(subject, x, [ClassifierOutputTarget(token)], boxes, distractors, mask, tolerance,
                                  PerturbationScorer(wrapper, x, token, self.percentiles, executor=executor,
                                                     **self.perturbation))
            # One row ahead: the next map's imputation runs on the executor's threads while this row's images go
            # through the model (benchmarks/benchmark_speed.md).
            started = None
            for method, layer in units:
                try:
                    following = self.start_row(sample, inputs, method, layer)
                except Exception:
                    if started is not None:  # the row before is whole: keep it
                        yield self.finish_row(sample, inputs, *started)
                    raise
                if started is not None:
                    yield self.finish_row(sample, inputs, *started)
                started = following
            if started is not None:
                yield self.finish_row(sample, inputs, *started)

    def start_row(self, sample: Sample, inputs: SampleInputs, method: str, layer: int
                  ) -> Tuple[str, int, np.ndarray, Optional[float], Callable[[], PerturbationScores]]:
        """The map of one (method, layer), the peak GPU memory while it was made (:func:`peak_memory`) and its
        perturbation scores started (:meth:`PerturbationScorer.start`)."""
        with peak_memory(inputs.x.device) as memory:
            cam = self.cam(inputs.subject, method, layer, inputs.x, inputs.targets, sample.index)
        seed_everything(self.seed, sample.index, method, layer, "road")
        ranks = ranked_map(cam, np.random.default_rng(np.random.randint(2 ** 31)))
        order = removal_order(cam, inputs.perturb.protocol.tie_order, ranks)
        return method, layer, cam, memory.gib, inputs.perturb.start(ranks if self.road_ties == "random" else cam,
                                                                    order)

    def finish_row(self, sample: Sample, inputs: SampleInputs, method: str, layer: int, cam: np.ndarray,
                   memory: Optional[float], finish: Callable[[], PerturbationScores]) -> dict:
        """The scores of one (method, layer) of a sample, from :meth:`start_row`'s map, memory and scores
        started."""
        seed_everything(self.seed, sample.index, method, layer, "road")  # the imputer's noise, as if drawn at once
        scores = finish()
        morf, lerf = scores.morf, scores.lerf
        row = dict(sample=sample.index, method=method, layer=layer, target_token=int(inputs.targets[0].category),
                   road_combined=(np.mean(lerf) - np.mean(morf)) / 2, road_morf=np.mean(morf), road_lerf=np.mean(lerf),
                   deletion_auc=scores.deletion_auc, insertion_auc=scores.insertion_auc,
                   deletion_auc_norm=scores.deletion_auc_norm, insertion_auc_norm=scores.insertion_auc_norm,
                   saturated=scores.saturated, answer_change=scores.answer_change,
                   top10_changed=scores.top_share_changed, pointing=None,
                   distractor=None, energy=None, mask_pointing=None, mask_energy=None, sanity=None,
                   sanity_cascade=None, peak_memory_gib=memory)
        tolerance = inputs.tolerance
        if inputs.boxes:
            row.update(pointing=any(pointing_hit(cam, box, tolerance) for box in inputs.boxes),
                       energy=energy_in_boxes(cam, inputs.boxes))
        if inputs.distractors:
            row["distractor"] = any(pointing_hit(cam, box, tolerance) for box in inputs.distractors)
        if inputs.mask is not None:
            row.update(mask_pointing=pointing_in_mask(cam, inputs.mask, tolerance),
                       mask_energy=energy_in_mask(cam, inputs.mask))
        for column, which in zip(("sanity", "sanity_cascade"), range(len(self.randomized))):
            random_cam = self.cam(self.subject(sample.prompt, which), method, layer, inputs.x, inputs.targets,
                                  sample.index)
            row[column] = spearman(cam, random_cam)
        row.update({curve_column("morf", p): v for p, v in zip(self.percentiles, morf)})
        row.update({curve_column("lerf", p): v for p, v in zip(self.percentiles, lerf)})
        return row

    def cam(self, subject, method: str, layer: int, x: torch.Tensor, targets, sample: int) -> np.ndarray:
        """The map of ``method`` at decoder layer ``layer`` for one image, ``(H, W)``. Seeded alike for the trained
        and the randomized model, so that RandomCAM draws the same weights for both."""
        method_cls = self.methods[method]
        seed_everything(self.seed, sample, method, layer, "map")
        with method_cls(model=subject.wrapper, target_layers=[subject.layers[layer]],
                        **cam_options(method_cls, subject.wrapper, {})) as cam:
            return cam(input_tensor=x, targets=targets)[0]


def answer_token(tokenizer, sample: Sample, texts: Optional[Sequence[str]] = None) -> int:
    """The first token of the sample's answer, checked to be known to the tokenizer; for CLIP models (``texts``
    given) the answer's index among the texts."""
    if texts is not None:
        if sample.answer not in texts:
            raise InputError(f"{sample.where}: the answer {sample.answer!r} is not one of --texts {list(texts)}.")
        return list(texts).index(sample.answer)
    ids = tokenizer.encode(sample.answer, add_special_tokens=False)
    if not ids or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id):
        raise InputError(f"{sample.where}: the tokenizer does not know the start of the answer {sample.answer!r}.")
    return int(ids[0])
