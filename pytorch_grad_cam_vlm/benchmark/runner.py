"""Faithfulness benchmark: which method and which decoder layer to trust, with numbers.

    pytorch-grad-cam-vlm benchmark --model PATH_OR_ID --data samples.jsonl --methods GradCAM,HiResCAM \\
        --layers auto --out bench/
    accelerate launch -m pytorch_grad_cam_vlm.benchmark --model ... --data ... --out bench/   # samples sharded

Every method x layer is scored on every sample against RandomCAM (always added as the baseline):

- ROAD (Rong et al. 2022, grad-cam's metric with this package's faster imputer, ``road.py``): the change of the
  target's logit when the most (MoRF) or least (LeRF) relevant pixels are removed and imputed, at each percentile;
  ``road_combined = (mean LeRF - mean MoRF) / 2``, as grad-cam's ``ROADCombined``: higher is better. Pixels of
  equal map value are removed in random order (``--road-ties``, :func:`ranked_map`).
- Deletion and insertion AUC (Petsiuk et al. 2018): the target's probability (``--auc-score``) as the map's most
  relevant pixels are removed onto, or inserted into, the protocol's canvases (``--auc-protocol``: ``black``,
  RISE's or EAGLE's, :mod:`pytorch_grad_cam_vlm.metrics.auc_protocols`); lower deletion and higher insertion AUC are
  better. Rows whose canvas keeps half the target's probability or more are flagged (``saturated``); the normalised
  AUCs leave them out. ``answer_change``: the share removed (deletion) when the model's top answer first changes;
  ``top10_changed``: whether removing the map's top 10 % changes it (:mod:`pytorch_grad_cam_vlm.metrics.answer_change`).
- Pointing game (the map's maximum in an evidence box, widened by ``--tolerance`` pixels), the same on the
  distractor boxes, and the share of the map's positive mass in the evidence boxes, where a sample has boxes; the
  same two on the union of its evidence masks, where it has masks (``mask_pointing``, ``mask_energy``).
- Model-parameter randomization (Adebayo et al. 2018): the Spearman rank correlation between the map of the trained
  model and the map, same method, layer, image and target, of a copy whose decoder layers and ``lm_head`` are
  re-initialised (:func:`randomized_copy`; ``sanity``), and of a copy re-initialised by the cascade from the output
  down through the vision tower (:func:`cascade_modules`; ``sanity_cascade``). Lower means the map depends more on
  what the model learned.

The target is the first token of the sample's answer, or without an answer the model's next token on the clean image.
A row's perturbed images go through the model in batches of ``--batch-size``; its imputation systems are solved on
``--imputation-threads`` threads (CPU) or by conjugate gradients on the GPU (CUDA), with the results of the serial
path (the imputer's noise is drawn afterwards, in order). The rows of a sample run one ahead: the next map's systems
are solved while this row's images go through the model.

Each row also holds the peak GPU memory while its map was made (``peak_memory_gib``; empty on the CPU). The rows of
a sample are scored by :class:`~pytorch_grad_cam_vlm.benchmark.scorer.Scorer`. ``--table eagle`` also writes EAGLE's
Table 2 of the run (:mod:`~pytorch_grad_cam_vlm.benchmark.eagle_table`; it needs ``--auc-protocol eagle``).

Rows of ``per_sample.csv`` are appended as they finish; a run started again with the same ``--out`` skips the rows
there (and refuses other settings). Each process of an ``accelerate launch`` takes the samples whose index modulo
the process count is its rank and appends to its own part file; the main process merges them. Random numbers
(RandomCAM's weights, ROAD's imputation noise) are seeded from ``--seed``, the sample's index, the method and the
layer, so results do not depend on the sharding or on which rows a resumed run still had to compute.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from pytorch_grad_cam_vlm.benchmark.data import load_samples
from pytorch_grad_cam_vlm.benchmark.eagle_table import AS_PUBLISHED, check_eagle_run, write_eagle_table
from pytorch_grad_cam_vlm.benchmark.report import BASELINE, write_outputs
from pytorch_grad_cam_vlm.benchmark.rows import PER_SAMPLE, RowWriter, consolidate, read_rows, row_fields, row_key
from pytorch_grad_cam_vlm.benchmark.scorer import Scorer, answer_token
from pytorch_grad_cam_vlm.demo import embedded_model_path
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.output import check_out_dir
from pytorch_grad_cam_vlm.methods.catalog import resolve_method
from pytorch_grad_cam_vlm.methods.sweep import select_layers
from pytorch_grad_cam_vlm.metrics.auc_protocols import CANVASES, DEFAULT_PROTOCOL, PROTOCOLS, TIES, protocol
from pytorch_grad_cam_vlm.metrics.perturbation import AUC_SCORES, SOLVERS
from pytorch_grad_cam_vlm.metrics.road import PERCENTILES
from pytorch_grad_cam_vlm.metrics.sanity import cascade_modules, randomized_copy
from pytorch_grad_cam_vlm.models.registry import (QWEN_MODEL_CLASSES, check_question, layer_count, load_model,
                                                  make_subject, model_config, resolve_device, resolve_dtype,
                                                  skip_last)

SETTINGS = "settings.json"


# ------------------------------------------------------------------------------------------------ command


def _percentiles(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as error:
        raise InputError(f"--percentiles {text}: expected numbers like 10,20,30.") from error
    if not values or any(not 0 < v < 100 for v in values) or len(set(values)) != len(values):
        raise InputError(f"--percentiles {text}: expected distinct numbers between 0 and 100 (exclusive).")
    return values


def _check_numbers(args: "BenchmarkOptions") -> None:
    """The options argparse's types and choices do not check (the runner is also called directly)."""
    for name, value, low in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                             ("--auc-steps", args.auc_steps, 2), ("--imputation-threads", args.imputation_threads, 1),
                             ("--bootstrap", args.bootstrap, 0)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise InputError(f"{name} {value}: expected a whole number >= {low}.")
    for name, value, choices in (("--auc-protocol", args.auc_protocol, tuple(PROTOCOLS)),
                                 ("--deletion-canvas", args.deletion_canvas, (None,) + CANVASES),
                                 ("--insertion-canvas", args.insertion_canvas, (None,) + CANVASES),
                                 ("--auc-ties", args.auc_ties, TIES),
                                 ("--auc-score", args.auc_score, AUC_SCORES), ("--solver", args.solver, SOLVERS),
                                 ("--table", args.table, (None, "eagle"))):
        if value not in choices:
            raise InputError(f"{name} {value}: expected one of {', '.join(c for c in choices if c)}.")


@dataclass
class BenchmarkOptions:
    """What to benchmark, as ``pytorch-grad-cam-vlm benchmark`` takes it (see its ``--help``)."""

    model: str  # a model folder, a hub id, or "demo"
    data: str  # JSONL or COCO-style .json
    out: str  # output folder; a run started again there resumes
    methods: str = "GradCAM"  # comma-separated method names; RandomCAM is always added
    layers: str = "auto"  # a preset of select_layers or indices like "3,5,7"
    texts: Optional[List[str]] = None  # CLIP / SigLIP captions
    percentiles: str = ",".join(map(str, PERCENTILES))
    tolerance: Optional[float] = None  # pointing-game tolerance in pixels (default half a token cell)
    limit: Optional[int] = None  # score only the first N samples
    seed: int = 0
    sanity: bool = True  # the model-parameter randomization check
    road_ties: str = "random"  # "random" or "threshold" (grad-cam's)
    coco_prompt: str = "Is there a {category} in this image?"
    coco_answer: Optional[str] = None  # COCO-style data: the answer to explain ({category} filled in)
    dtype: str = "auto"
    device: str = "auto"
    allow_pickle: bool = False  # load a pickle checkpoint (it can run code)
    trust_remote_code: bool = False
    batch_size: Optional[int] = None  # perturbed images per forward pass (default: metrics.perturbation's auto)
    auc_protocol: str = DEFAULT_PROTOCOL  # deletion / insertion protocol: a preset of auc_protocols.PROTOCOLS
    deletion_canvas: Optional[str] = None  # the deletion canvas (default: the protocol's)
    insertion_canvas: Optional[str] = None  # the insertion canvas (default: the protocol's)
    auc_steps: Optional[int] = None  # deletion / insertion steps, evenly spaced (default: the protocol's)
    auc_ties: str = "protocol"  # order of equal map values: the protocol's, or "random" (seeded)
    auc_score: str = "probability"  # "probability" (softmax) or "logit"
    bootstrap: int = 1000  # bootstrap resamples of the samples for the 95 % intervals (0: none)
    imputation_threads: Optional[int] = None  # ROAD's imputation threads (default: this process's share of cores)
    solver: str = "auto"  # ROAD's imputation: "direct" (CPU), "cg" (torch), "auto" (cg on CUDA)
    table: Optional[str] = None  # "eagle": also write EAGLE's Table 2 (benchmark.eagle_table)


def _settings(args: BenchmarkOptions, model: str, percentiles: Sequence[float]) -> dict:
    """What each per-sample row depends on beyond its key: a resumed run must match."""
    return dict(model=os.path.abspath(model) if os.path.exists(model) else model,
                data=os.path.abspath(args.data), percentiles=list(percentiles), seed=args.seed,
                tolerance=args.tolerance, sanity=args.sanity, coco_prompt=args.coco_prompt,
                coco_answer=args.coco_answer, dtype=args.dtype,
                road_ties=args.road_ties, auc_protocol=args.auc_protocol, deletion_canvas=args.deletion_canvas,
                insertion_canvas=args.insertion_canvas, auc_steps=args.auc_steps, auc_ties=args.auc_ties,
                auc_score=args.auc_score)


def _check_resume(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, SETTINGS)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        previous = json.load(f)
    changed = [f"{k} {previous.get(k)!r} there, {v!r} here" for k, v in settings.items() if previous.get(k) != v]
    if changed:
        raise InputError(f"--out {out_dir} holds a benchmark run with other settings ({'; '.join(changed)}): run "
                         "again with the same settings to resume, or use another --out.")


def run(args: BenchmarkOptions, after_row: Optional[Callable[[dict], None]] = None) -> int:
    """Run the benchmark of ``args``; ``after_row`` is called with each finished row. Every process checks every
    input alike before the first barrier, so bad input fails everywhere at once."""
    from accelerate import PartialState
    from tqdm import tqdm

    state = PartialState()
    percentiles = _percentiles(args.percentiles)
    _check_numbers(args)
    if args.table == "eagle":
        check_eagle_run({key: getattr(args, key) for key in AS_PUBLISHED}, "--table eagle")
    chosen = protocol(args.auc_protocol, args.deletion_canvas, args.insertion_canvas, args.auc_steps, args.auc_ties)
    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    methods = {cls.__name__: cls for cls in map(resolve_method, names + [BASELINE])}
    model_name = embedded_model_path(args.model)
    config, family = model_config(model_name)
    qwen = family in QWEN_MODEL_CLASSES
    if qwen and args.texts:
        raise InputError("--texts is for CLIP and SigLIP models; a Qwen model takes the prompts of the data.")
    if not qwen:
        check_question(family, None, args.texts)
    samples = load_samples(args.data, args.limit, args.coco_prompt, needs_prompt=qwen, coco_answer=args.coco_answer)
    try:
        layers = select_layers(layer_count(config, family), args.layers, skip_last=skip_last(family, True))
    except ValueError as error:
        raise InputError(f"--layers {args.layers}: {error}") from error
    check_out_dir(args.out)
    settings = _settings(args, model_name, percentiles)
    _check_resume(args.out, settings)
    fields = row_fields(percentiles)

    state.wait_for_everyone()
    if state.is_main_process:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, SETTINGS), "w") as f:
            json.dump(settings, f, indent=2)
        consolidate(args.out, fields)  # rows a killed run left in part files
    state.wait_for_everyone()

    device = state.device if args.device == "auto" else resolve_device(args.device)
    model, processor = load_model(model_name, family, resolve_dtype(args.dtype, device), device, args.allow_pickle,
                                  args.trust_remote_code)
    for sample in samples:
        if sample.answer is not None:
            answer_token(processor.tokenizer, sample, args.texts)
    randomized = []  # the independent form, then the cascade's last stage
    if args.sanity:
        wrapper = make_subject(family, model, processor, samples[0].prompt, args.texts).wrapper
        randomized = [randomized_copy(model, wrapper.layers, args.seed),
                      randomized_copy(model, cascade_modules(wrapper), args.seed)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.imputation_threads or max(1, cores // state.num_processes)
    scorer = Scorer(family, model, processor, methods, percentiles, args.seed, args.tolerance, randomized,
                    args.road_ties, args.texts, threads, batch_size=args.batch_size, protocol=chosen,
                    score=args.auc_score, solver=args.solver)

    done = {row_key(row) for row in read_rows(os.path.join(args.out, PER_SAMPLE))}
    work = [(sample, [(m, l) for m in methods for l in layers if (sample.index, m, l) not in done])
            for sample in samples if sample.index % state.num_processes == state.process_index]
    work = [(sample, units) for sample, units in work if units]
    writer = RowWriter(os.path.join(args.out, f"per_sample.part{state.process_index}.csv"), fields)
    progress = tqdm(total=sum(len(units) for _, units in work), desc="benchmark", unit="map",
                    disable=not state.is_main_process)
    try:
        for sample, units in work:
            for row in scorer.rows(sample, units):
                writer.write(row)
                progress.update()
                if after_row is not None:
                    after_row(row)
    finally:
        writer.close()
        progress.close()
    state.wait_for_everyone()
    if state.is_main_process:
        rows = consolidate(args.out, fields)
        wanted = {s.index for s in samples}
        rows = [r for r in rows if int(r["sample"]) in wanted]
        steps = f"{chosen.steps} steps" if chosen.steps else f"{chosen.rows_per_step} image rows per step"
        header = (f"Faithfulness benchmark of {args.model} on {len(samples)} samples of {args.data} (seed "
                  f"{args.seed}; ROAD percentiles {', '.join(f'{p:g}' for p in percentiles)}; deletion / insertion "
                  f"protocol {args.auc_protocol}: {steps}, deletion onto the {chosen.deletion_canvas} canvas, "
                  f"insertion from the {chosen.insertion_canvas} canvas, ties {chosen.tie_order}; AUC of the target's "
                  f"{args.auc_score}).")
        paths = write_outputs(args.out, rows, list(methods), layers, percentiles, header, args.bootstrap, args.seed)
        if args.table == "eagle":
            paths.append(write_eagle_table(args.out))
        with open(paths[1]) as f:
            print(f.read())
        print(f"Wrote {os.path.join(args.out, PER_SAMPLE)}, " + ", ".join(paths) + ".")
    return 0
