"""``explain --video`` end to end on a tiny Qwen2.5-VL saved to disk: a folder of frames and a video file give the
strip figure, the GIF, the per-pair maps on the frames (equal to a direct grad-cam call) and the report; each bad
input one exact error line, exit code 2 and nothing written."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import QwenVLWrapper
from pytorch_grad_cam_vlm.cli import main
from pytorch_grad_cam_vlm.models.registry import load_model
from pytorch_grad_cam_vlm.models.video import pair_maps_on_frames

PROMPT = "What color is the circle?"
ERROR = "pytorch-grad-cam-vlm: error: "
FRAME = (60, 90)


@pytest.fixture(scope="module")
def wrapper(tiny_qwen_dir):
    model, processor = load_model(tiny_qwen_dir, "qwen2_5_vl", torch.float32, torch.device("cpu"))
    return QwenVLWrapper(model, processor, prompt=PROMPT)


def frames(n, size=FRAME):
    return [random_image(*size, seed=k) for k in range(n)]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder of 5 frames (and a text file, skipped), a 12-frame AVI at 10 fps, and the bad inputs."""
    root = tmp_path_factory.mktemp("media")
    folder = root / "clip"
    folder.mkdir()
    for k, frame in enumerate(frames(5)):
        Image.fromarray(frame).save(folder / f"frame_{k:02d}.png")
    (folder / "notes.txt").write_text("not a frame, skipped")
    writer = cv2.VideoWriter(str(root / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, FRAME[::-1])
    for frame in frames(12):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    (root / "one").mkdir()
    Image.fromarray(frames(1)[0]).save(root / "one" / "a.png")
    (root / "sizes").mkdir()
    Image.fromarray(frames(1)[0]).save(root / "sizes" / "a.png")
    Image.fromarray(random_image(40, 40)).save(root / "sizes" / "b.png")
    (root / "empty").mkdir()
    (root / "broken.mp4").write_bytes(b"not a video")
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def reference_pairs(wrapper, pictures, fps, indices=None, total=None):
    """The predicted token and GradCAM's map at decoder layer 1 of the video by hand, split per pair on the frames."""
    x = wrapper.preprocess_video(pictures, fps, indices, total)
    with torch.no_grad():
        token = int(wrapper(x).argmax())
    with GradCAM(model=wrapper, target_layers=[wrapper.decoder_layers[1]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        maps = cam(x, [ClassifierOutputTarget(token)])
    return wrapper.processor.tokenizer.decode([token]), pair_maps_on_frames(maps[0], wrapper.video)


def test_a_folder_of_frames_writes_the_strip_gif_pair_maps_and_report(capsys, tmp_path, tiny_qwen_dir, wrapper, media):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "explain", "--model", tiny_qwen_dir, "--video", media / "clip", "--prompt",
                               PROMPT, "--method", "GradCAM", "--layers", "1", "--out", out)
    assert code == 0, stderr
    assert "Explained 5 frames of" in stdout and "(3 frame pairs) with GradCAM at decoder layer 1" in stdout
    [row] = json.loads((out / "report.json").read_text())
    assert row["files"] == ["clip_GradCAM_video.png", "clip_GradCAM_video.gif", "clip_GradCAM_pairs.npy"]
    assert sorted(os.listdir(out)) == sorted(["report.json", "report.csv"] + row["files"])
    assert row["image"] == str(media / "clip") and row["mode"] == "video" and row["layers"] == [1]
    assert row["frames"] == 5 and row["fps"] == 2.0 and row["frame_indices"] == [0, 1, 2, 3, 4]
    assert row["pairs"] == ["0+1", "2+3", "4"] and sum(row["pair_shares"]) == pytest.approx(1, abs=1e-5)
    token, expected = reference_pairs(wrapper, frames(5), 2.0)
    assert row["predicted_token"] == token
    saved = np.load(out / row["files"][2])
    assert saved.shape == (3,) + FRAME
    np.testing.assert_allclose(saved, expected, atol=1e-5)
    with Image.open(out / row["files"][1]) as gif:
        assert gif.n_frames == 5 and gif.size == FRAME[::-1] and gif.info["duration"] == 500
    with Image.open(out / row["files"][0]) as strip:
        assert strip.size[0] == 5 * 256


def test_a_video_file_is_sampled_at_fps(capsys, tmp_path, tiny_qwen_dir, wrapper, media):
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "explain", "--model", tiny_qwen_dir, "--video", media / "clip.avi", "--prompt",
                          PROMPT, "--method", "GradCAM", "--layers", "1", "--fps", 5, "--out", out)
    assert code == 0, stderr
    [row] = json.loads((out / "report.json").read_text())
    # 12 frames at 10 fps, sampled at 5 fps: 6 frames, from the first to the last
    assert row["frames"] == 6 and row["fps"] == 10.0 and row["frame_indices"] == [0, 2, 4, 7, 9, 11]
    assert row["files"][0] == "clip_GradCAM_video.png" and np.load(out / row["files"][2]).shape == (3,) + FRAME
    with Image.open(out / row["files"][1]) as gif:
        assert gif.n_frames == 6 and gif.info["duration"] == 220  # 6 frames over 1.1 s
    capture = cv2.VideoCapture(str(media / "clip.avi"))
    decoded = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    token, expected = reference_pairs(wrapper, [decoded[i] for i in row["frame_indices"]], 10.0,
                                      row["frame_indices"], 12)
    assert row["predicted_token"] == token
    np.testing.assert_allclose(np.load(out / row["files"][2]), expected, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(video="{media}/one"), "{media}/one holds one frame: a video needs at least 2 (Qwen's video encoder takes "
                                "frames in pairs); explain a single picture with --image."),
    (dict(video="{media}/sizes"), "The frames of {media}/sizes have different sizes (a.png is 90x60, b.png is 40x40): "
                                  "a video's frames share one size; resize them to one size first."),
    (dict(video="{media}/empty"), "No frame images in folder {media}/empty: put the video's frames there as image "
                                  "files (taken in the order of their names), or pass a video file."),
    (dict(video="{media}/missing.mp4"), "Video file or folder not found: {media}/missing.mp4"),
    (dict(video="{media}/broken.mp4"), "Cannot read {media}/broken.mp4 as a video (OpenCV opens no video stream in "
                                       "it): convert it to MP4, or pass a folder of its frames as images."),
    (dict(model="onevision"), "--video takes Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE "
                              "models; a LLaVA-OneVision model takes no video here: explain its frames one at a time "
                              "with --image (a folder of frames runs as a batch)."),
    (dict(mode="grid"), "--mode grid: --video draws its own figures (a strip of the frames and an animation); leave "
                        "--mode out."),
    (dict(max_frames="1"), "A video needs at least 2 frames (Qwen's video encoder takes frames in pairs): "
                           "--max-frames 1 is too few."),
    (dict(fps="0"), "--fps must be a positive number of frames per second, got 0.0."),
    (dict(video=None, image="{media}/one/a.png", fps="2"),
     "--fps and --max-frames say how to sample a --video; leave them out with --image."),
])
def test_bad_video_input_gets_one_line_exit_2_and_nothing_written(capsys, tmp_path, tiny_qwen_dir, media, change,
                                                                   message):
    options = {"model": tiny_qwen_dir, "video": "{media}/clip", "prompt": PROMPT, **change}
    argv = ["explain", "--out", tmp_path / "out"]
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", value.format(media=media)]
    code, _, stderr = run(capsys, *argv)
    assert code == 2
    assert stderr == ERROR + message.format(media=media) + "\n"
    assert os.listdir(tmp_path) == []
