"""``explain --video``: one map per frame pair of a video (a file or a folder of frames) on the Qwen families: a strip
figure of the frames, each under its pair's map, an animated GIF of the overlays, the maps as ``.npy`` and the
report."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from pytorch_grad_cam_vlm.cli.common import (PROG, check_note, explain_batch, inner_progress_silenced, load_subject,
                                             margin_cell, method_name, smooth_options, target_cells)
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.image import DEFAULT_FPS, DEFAULT_MAX_FRAMES, VideoFrames, read_video
from pytorch_grad_cam_vlm.layers import Layer, layer_name
from pytorch_grad_cam_vlm.methods.auto import candidate_methods, explain
from pytorch_grad_cam_vlm.models.classifier import is_classifier_spec
from pytorch_grad_cam_vlm.models.registry import Subject, check_video_family
from pytorch_grad_cam_vlm.models.video import pair_maps_on_frames, pair_shares
from pytorch_grad_cam_vlm.visualize import save_maps, save_video_gif, save_video_strip

VIDEO_LEGEND = ("One map per frame pair (the video encoder's temporal patch of 2 frames), drawn on both of its frames; "
                "each label's % is the pair's share of the map's mass. Colours: the map scaled to [0, 1].")


def run_video(args: argparse.Namespace) -> int:
    """Check every input (the video, the model by its config alone), then load the model and explain the video."""
    if args.per_token:
        raise InputError("--per-token draws an image's map per answer token; with --video, pass --answer to explain "
                         "a whole answer.")
    if args.mode not in (None, "single"):
        raise InputError(f"--mode {args.mode}: --video draws its own figures (a strip of the frames and an "
                         "animation); leave --mode out.")
    if is_classifier_spec(args.model):
        raise InputError(f"{args.model} is an image classifier; --video takes a Qwen vision-language model.")
    methods = candidate_methods(args.method)
    smooth = smooth_options(methods, args.n_samples, args.noise_level, args.seed)
    try:
        video = read_video(args.video, DEFAULT_FPS if args.fps is None else args.fps,
                           DEFAULT_MAX_FRAMES if args.max_frames is None else args.max_frames)
    except (ValueError, OSError) as error:
        raise InputError(str(error).split("\n")[0]) from error
    subject, layers, kept, stale = load_subject(args, methods, smooth, check_video_family)
    name = method_name(args.method, methods)
    source = os.path.normpath(args.video)

    def explain_one(path: str, stem: str, staging: str, progress) -> dict:
        return explain_video(subject, video, stem, methods, name, layers, smooth, staging, path,
                             "peak" if args.fast else "staged")

    rows = explain_batch(args.out, [source], explain_one, kept, stale)
    if not rows:
        print(f"{source} is explained in {args.out} already (--resume): nothing to do.")
    for row in rows:
        print(f"Explained {row['frames']} frames of {source} ({len(row['pairs'])} frame pairs) with {row['method']} "
              f"at {layer_name(row['layers'][0], 'decoder')}; wrote {len(row['files']) + 2} files to {args.out}, "
              f"listed in {os.path.join(args.out, 'report.csv')} and report.json.")
    return 0


def explain_video(subject: Subject, video: VideoFrames, stem: str, methods: Sequence[type], method_label: str,
                  layers: Sequence[Layer], options: dict, out_dir: str, source: str, choice: str = "staged") -> dict:
    """The best-checked map (:func:`~pytorch_grad_cam_vlm.methods.auto.explain`) of the predicted token (or the
    answer) for a video's frames on one canvas, split into one map per frame pair on the user's frames: the strip
    figure, the GIF and the maps ``(pairs, H0, W0)`` written into ``out_dir``, one warning line on stderr when the
    map fails the check or the target hardly depends on the video. Returns the report row."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    wrapper = subject.wrapper
    try:
        x = wrapper.preprocess_video(video.frames, video.fps, video.indices, video.total)
    except ValueError as error:
        raise InputError(f"{source}: {error}") from error
    clip = wrapper.video
    index, label, probability = subject.predict(x)
    with inner_progress_silenced(methods):
        result = explain(wrapper, x, [ClassifierOutputTarget(index)], methods, layers, options=options,
                         choice=choice, fallback=method_label == "auto")
    check, reliance, layer = result.checks[0], result.reliance[0], result.layers[0]
    warnings = [w for w in [result.layer_warning(source, layer), *result.fallback_lines(source),
                            reliance.warning(source)] if w]
    for line in warnings:
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    pairs = pair_maps_on_frames(result.model_maps[0], clip)  # (P, H0, W0) on the user's frames
    shares = pair_shares(result.model_maps[:1], clip)[0]
    frames = np.stack([np.asarray(frame, dtype=np.float32) / 255 for frame in video.frames])
    of_frame = list(clip.pair_of_frame)
    labels = [f"{name} · {t:.2f} s · pair {k + 1}: {share:.0%}" if np.isfinite(share) else f"{name} · {t:.2f} s"
              for name, t, k, share in zip(video.names, clip.timestamps, of_frame, shares[of_frame])]
    chosen = f"{method_label} → {result.methods[0]}" if method_label != result.methods[0] else method_label
    title = f"{chosen} · {layer_name(layer)} · target {label!r} · {check_note(check, reliance.clean)}"
    prefix = os.path.join(out_dir, f"{stem}_{result.methods[0]}")
    per_frame = pairs[of_frame]
    files = [save_video_strip(f"{prefix}_video.png", frames, per_frame, labels, title, VIDEO_LEGEND),
             save_video_gif(f"{prefix}_video.gif", frames, per_frame, clip.sampled_fps),
             save_maps(f"{prefix}_pairs.npy", pairs)]
    return dict(image=source, **target_cells(wrapper, label, probability),
                method=result.methods[0], mode="video", layers=[layer], check=[round(check.score, 6)],
                peak_drop=[round(check.peak_drop, 6)], verdict=[check.verdict], null_margin=[margin_cell(check)],
                clean_score=round(reliance.clean, 6), visual_reliance=round(reliance.share, 6),
                frames=clip.n_frames, fps=clip.fps, frame_indices=list(clip.frame_indices),
                pairs=["+".join(str(i) for i in pair) for pair in clip.pairs],
                pair_shares=[round(float(s), 6) for s in shares],
                candidates=f"{'/'.join(result.candidate_methods)} x layers "
                f"{','.join(map(str, result.candidate_layers))}",
                warning=" ".join(warnings), files=[os.path.basename(f) for f in files])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fps`` and ``--max-frames``, the options of ``explain --video``."""
    parser.add_argument("--fps", type=float,
                        help=f"--video: frames per second to sample a video file at (default {DEFAULT_FPS:g}, as "
                             "Qwen's processors sample), or the rate a folder's frames were taken at")
    parser.add_argument("--max-frames", type=int,
                        help=f"--video: the most frames to explain, spread evenly over the video (default "
                             f"{DEFAULT_MAX_FRAMES})")
