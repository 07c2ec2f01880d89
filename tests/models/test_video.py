"""A video in one prompt (Qwen2.5-VL, Qwen3-VL): the canvas's logits equal the processor's with the video, its frames
are patchified exactly as the video processor does (temporal patch 2, an odd last frame repeated), reshape_transform
puts each frame pair's patches and tokens on both of its frames, and a map splits into one map per pair."""
import numpy as np
import pytest
import torch
from conftest import (PROMPT, VLM_METHODS, changed_cells, check_method_on_decoder_and_vision, first_block_inputs,
                      model_state, perturb_cell, projector_and_decoder_input, random_image)
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import Qwen3VLWrapper, QwenVLWrapper, build_tiny_qwen3_vl, explain
from pytorch_grad_cam_vlm.models.qwen_patches import patchify_video
from pytorch_grad_cam_vlm.models.video import frames_of, pair_maps, pair_maps_on_frames, pair_shares

FRAME = (60, 90)  # the user's frames: resized by the tiny video processors to 2x3 (Qwen2.5-VL) or 2x3 (Qwen3-VL) cells


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family(request, tiny_qwen, tmp_path_factory):
    if request.param == "qwen2_5_vl":
        return (*tiny_qwen, QwenVLWrapper)
    return (*build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3"), seed=0), Qwen3VLWrapper)


def video(n_frames, size=FRAME, seed=0):
    return np.stack([random_image(*size, seed=seed + k) for k in range(n_frames)])


def processor_inputs(processor, frames, fps=2.0, answer=""):
    """The reference path: the processor on the chat with a video and its frames, every frame kept (Qwen3-VL's
    processor would sample them otherwise), taken at ``fps``."""
    content = [{"type": "video"}, {"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    metadata = {"fps": fps, "frames_indices": list(range(len(frames))), "total_num_frames": len(frames)}
    return processor(text=[text + answer], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                     return_tensors="pt")


@pytest.mark.parametrize("n_frames", [4, 5, 6])
def test_logits_equal_the_processor_path(family, n_frames):
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    frames = video(n_frames)
    x = wrapper.preprocess_video(list(frames), fps=2.0)
    inputs = processor_inputs(processor, frames)
    clip, (t, gh, gw) = wrapper.video, inputs["video_grid_thw"][0].tolist()
    assert t == (n_frames + 1) // 2 and clip.n_frames == n_frames
    assert clip.pairs[-1] == tuple(range(2 * t - 2, n_frames))  # an odd last frame alone
    c = wrapper.token_cell
    h, w = gh * wrapper.patch_size, gw * wrapper.patch_size
    assert clip.frame_size == (h, w) and x.shape == (1, 3, h, c + n_frames * (w + c))
    # the frames cut from the canvas are the processor's pixels, patchified as the video processor does
    cut = frames_of(x, clip)
    assert torch.equal(patchify_video(cut, wrapper.patch_size, wrapper.merge_size, 2), inputs["pixel_values_videos"])
    with torch.no_grad():
        output = wrapper(x.repeat(2, 1, 1, 1))
        reference = model(**inputs).logits[0, -1]
    np.testing.assert_allclose(output[1].numpy(), reference.numpy(), atol=1e-5)
    np.testing.assert_allclose(output[0].numpy(), output[1].numpy(), atol=1e-6)


def test_answer_score_equals_the_processor_path(family):
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT, answer="red circle")
    frames = video(4, seed=3)
    with torch.no_grad():
        score = wrapper(wrapper.preprocess_video(list(frames)))
        logits = model(**processor_inputs(processor, frames, answer="red circle")).logits[0]
    ids = wrapper.layout.answer_ids
    expected = torch.log_softmax(logits[-len(ids) - 1:-1], -1).gather(-1, ids[:, None]).sum()
    np.testing.assert_allclose(float(score[0, 0]), float(expected), atol=1e-5)


def test_frame_times_reach_the_model(family):
    """Qwen2.5-VL reads a frame pair's duration (second_per_grid_ts), Qwen3-VL a timestamp before each pair: the
    wrapper's logits follow the processor's at another frame rate, and differ from those at 2 fps."""
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    frames = video(4)
    with torch.no_grad():
        slow = wrapper(wrapper.preprocess_video(list(frames), fps=0.5))[0]
        fast = wrapper(wrapper.preprocess_video(list(frames), fps=2.0))[0]
        reference = model(**processor_inputs(processor, frames, fps=0.5)).logits[0, -1]
    np.testing.assert_allclose(slow.numpy(), reference.numpy(), atol=1e-5)
    assert float((slow - fast).abs().max()) > 1e-4


def test_one_cell_of_frame_pair_k_changes_only_that_cell_of_pair_k(family):
    """Perturb one token cell of the second frame of pair 1: the first vision block's input (patch embeddings, in the
    encoder's order) changes only at the patches that reshape_transform puts on that cell of pair 1's two frames."""
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    c, p, m = wrapper.token_cell, wrapper.patch_size, wrapper.merge_size
    x = wrapper.preprocess_video(list(video(6)))
    clip = wrapper.video
    row, col = 1, 2
    top, left = clip.boxes.boxes[3][:2]  # frame 3: the second frame of pair 1
    changed = changed_cells(wrapper, *first_block_inputs(wrapper, x, perturb_cell(x, top, left, row, col, c)))
    expected = torch.zeros_like(changed)
    for frame in (2, 3):
        top, left = clip.boxes.boxes[frame][:2]
        expected[(top + row * c) // p:(top + row * c) // p + m, (left + col * c) // p:(left + col * c) // p + m] = True
    assert torch.equal(changed, expected)


def test_decoder_layers_and_merger_put_each_pairs_tokens_on_its_frames(family):
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    c = wrapper.token_cell
    x = wrapper.preprocess_video(list(video(5)))
    with torch.no_grad():
        wrapper(x)
    layout, clip = wrapper.layout, wrapper.video
    (gh, gw), seq = (s // c for s in clip.frame_size), layout.text_inputs["input_ids"].shape[1]
    positions = layout.vision_positions
    assert len(positions) == 3 * gh * gw and layout.grid_thw.tolist() == [[3, 2 * gh, 2 * gw]]
    grid = wrapper.reshape_transform(torch.arange(seq, dtype=torch.float32).view(1, seq, 1))[0, 0]
    expected = torch.zeros(gh, x.shape[3] // c)
    for frame, pair in enumerate(clip.pair_of_frame):  # frames 0, 1: pair 0; 2, 3: pair 1; 4 alone: pair 2
        left = clip.boxes.boxes[frame][1] // c
        expected[:, left:left + gw] = positions[pair * gh * gw:(pair + 1) * gh * gw].view(gh, gw).float()
    assert torch.equal(grid, expected)
    merger, embeds = projector_and_decoder_input(wrapper, x)
    np.testing.assert_allclose(merger.numpy(), embeds.numpy(), atol=1e-6)


def test_a_map_hot_on_one_token_cell_lands_on_that_pairs_frames_only(family):
    """One token of pair 1 hot, upsampled to the canvas as grad-cam does: pair 1's map is hot on that cell, every
    other pair's map is exactly 0, and both of pair 1's frames hold the same map."""
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    c = wrapper.token_cell
    x = wrapper.preprocess_video(list(video(6)))
    with torch.no_grad():
        wrapper(x)
    clip, positions = wrapper.video, wrapper.layout.vision_positions
    gh, gw = (s // c for s in clip.frame_size)
    row, col = 0, gw - 1  # at the frame's right edge, beside the next pair's frame
    hidden = torch.zeros(1, wrapper.layout.text_inputs["input_ids"].shape[1], 1)
    hidden[0, positions[gh * gw + row * gw + col]] = 1.0
    grid = wrapper.reshape_transform(hidden)[:, 0].numpy()
    maps = scale_cam_image(grid, (x.shape[3], x.shape[2]))  # grad-cam's bilinear upsampling
    pairs = pair_maps(maps, clip)[0]
    assert pairs.shape == (3,) + clip.frame_size
    assert pairs[0].max() == 0 and pairs[2].max() == 0
    peak = np.unravel_index(pairs[1].argmax(), pairs[1].shape)
    assert peak[0] // c == row and peak[1] // c == col
    top, left, h, w = clip.boxes.boxes[3]
    np.testing.assert_array_equal(maps[0, top:top + h, left:left + w], pairs[1])  # frame 3 = frame 2
    np.testing.assert_allclose(pair_shares(maps, clip)[0], [0, 1, 0])
    on_frames = pair_maps_on_frames(maps[0], clip)
    assert on_frames.shape == (3,) + FRAME and on_frames[[0, 2]].max() == 0


def test_gradcam_and_explain_run_on_the_canvas(family):
    model, processor, wrapper_cls = family
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    x = wrapper.preprocess_video(list(video(5)))
    clip = wrapper.video
    before = model_state(model)
    for layers in ([wrapper.decoder_layers[1]], [wrapper.vision_blocks[1]], [wrapper.merger]):
        with GradCAM(model=wrapper, target_layers=layers, reshape_transform=wrapper.reshape_transform) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(3)])
        assert maps.shape == (1,) + tuple(x.shape[2:]) and maps.max() > 0
        for frame, pair in enumerate(clip.pair_of_frame):  # each frame holds its pair's map
            top, left, h, w = clip.boxes.boxes[frame]
            np.testing.assert_array_equal(maps[0, top:top + h, left:left + w], pair_maps(maps, clip)[0, pair])
    assert model_state(model) == before
    result = explain(wrapper, x, [ClassifierOutputTarget(3)], method="GradCAM", layers="projector,1")
    assert result.model_maps.shape == (1,) + tuple(x.shape[2:]) and wrapper.video == clip
    assert pair_shares(result.model_maps, clip).sum() == pytest.approx(1)


@pytest.mark.parametrize("method", VLM_METHODS, ids=lambda m: m.__name__)
def test_every_gradcam_method_runs_on_a_video(method, tiny_qwen):
    """grad-cam's methods take the video's canvas as any input (its layout holds every pair's tokens), and each frame
    holds its pair's map."""
    model, processor = tiny_qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    x = wrapper.preprocess_video(list(video(4)))
    check_method_on_decoder_and_vision(method, model, wrapper, x, wrapper.decoder_layers[2],
                                       "vision blocks and mergers are not supported")
    extra = {"ablation_layer": wrapper.ablation_layer()} if method.__name__ == "AblationCAM" else {}
    with method(model=wrapper, target_layers=[wrapper.decoder_layers[1]], reshape_transform=wrapper.reshape_transform,
                **extra) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(3)])
    clip = wrapper.video
    # The SVD methods' projections round per position (1e-6), KPCA's float32 kernel per pair of positions (2e-4
    # measured).
    tolerance = 1e-3 if method.__name__ == "KPCA_CAM" else 1e-6
    for frame, pair in enumerate(clip.pair_of_frame):
        top, left, h, w = clip.boxes.boxes[frame]
        np.testing.assert_allclose(maps[0, top:top + h, left:left + w], pair_maps(maps, clip)[0, pair],
                                   atol=tolerance)


@pytest.mark.parametrize("frames, message", [
    (lambda: [random_image(*FRAME)], "A video needs at least 2 frames (Qwen's video encoder takes frames in pairs), "
                                     "got 1: explain a single frame as an image with wrapper.preprocess(frame)."),
    (lambda: [random_image(*FRAME), random_image(40, 40)],
     "The frames of the video have different sizes (frame 0 is 90x60, frame 1 is 40x40): a video's frames share one "
     "size; resize them to one size first."),
    (lambda: [], "A video needs at least 2 frames (Qwen's video encoder takes frames in pairs), got 0: explain a "
                 "single frame as an image with wrapper.preprocess(frame)."),
])
def test_bad_frames_are_refused(tiny_qwen, frames, message):
    wrapper = QwenVLWrapper(*tiny_qwen, prompt=PROMPT)
    with pytest.raises(ValueError) as error:
        wrapper.preprocess_video(frames())
    assert str(error.value) == message and wrapper.video is None


def test_a_canvas_of_another_size_and_images_after_a_video(tiny_qwen):
    wrapper = QwenVLWrapper(*tiny_qwen, prompt=PROMPT)
    x = wrapper.preprocess_video(list(video(4)))
    h, w = x.shape[2:]
    with pytest.raises(ValueError) as error:
        wrapper(x[:, :, :, :w - wrapper.token_cell])
    assert str(error.value) == (f"The video's 4 frames were prepared as a canvas of {h}x{w} pixels, got "
                                f"{h}x{w - wrapper.token_cell}: prepare them again with "
                                "wrapper.preprocess_video(frames).")
    single = wrapper.preprocess(random_image(56, 56))  # an image again: the video is forgotten
    assert wrapper.video is None and wrapper(single).shape[0] == 1
    with pytest.raises(ValueError, match="fps must be a positive number"):
        wrapper.preprocess_video(list(video(4)), fps=0)


def test_a_family_without_video_support_is_refused(tmp_path):
    from pytorch_grad_cam_vlm import Glm4vWrapper, build_tiny_glm4v

    wrapper = Glm4vWrapper(*build_tiny_glm4v(tmp_path, seed=0), prompt=PROMPT)
    with pytest.raises(ValueError) as error:
        wrapper.preprocess_video(list(video(4)))
    assert str(error.value) == ("Glm4vWrapper does not take video here; videos work with Qwen2-VL, Qwen2.5-VL, "
                                "Qwen3-VL and Qwen3.5 models. Explain the frames one at a time as images.")
    assert wrapper.video is None


def test_attention_map_puts_each_pairs_attention_on_both_its_frames(tiny_qwen):
    from pytorch_grad_cam_vlm.methods.attention import AttentionMap
    from pytorch_grad_cam_vlm.models.state import eager_attention

    model, processor = tiny_qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    frames = video(4)
    inputs = processor_inputs(processor, frames)
    positions = (inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids(processor.video_token)).nonzero()
    with eager_attention(model), torch.no_grad():
        weights = model(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)[positions.flatten()]
    x = wrapper.preprocess_video(list(frames))
    clip, cell = wrapper.video, wrapper.token_cell
    with AttentionMap(model=wrapper, target_layers=[wrapper.decoder_layers[1]]) as cam:
        cam(input_tensor=x, targets=None)
        raw = cam.activations_and_grads.activations[0][0, 0]
    per_pair = len(weights) // (len(frames) // 2)
    for frame, pair in enumerate(clip.pair_of_frame):
        top, left, h, w = (v // cell for v in clip.boxes.boxes[frame])
        assert h * w == per_pair
        torch.testing.assert_close(raw[top:top + h, left:left + w].flatten(),
                                   weights[pair * per_pair:(pair + 1) * per_pair], atol=1e-6, rtol=0)
