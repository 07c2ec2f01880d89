"""Bad input, as a new user hands it over: each case gets exit code 2 (or the documented exception) with one line
that names the bad thing and what to do, and leaves nothing in the output folder; or documented, tested behaviour."""
import errno
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import PROMPT, random_image
from PIL import Image

from pytorch_grad_cam_vlm import (QwenVLWrapper, SmoothGradCAM, WordTarget, build_tiny_model, explain, layer_sweep,
                                  select_layers)
from pytorch_grad_cam_vlm.cli import main
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.image import load_rgb
from pytorch_grad_cam_vlm.output import staged_output

ERROR = "pytorch-grad-cam-vlm: error: "


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder and images of every kind a user may hand over."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    build_tiny_model(folder / "model", seed=0)
    Image.fromarray(random_image(56, 84)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:200])
    (folder / "empty").mkdir()
    (folder / "wide").mkdir()
    Image.fromarray(np.zeros((20, 10000, 3), np.uint8)).save(folder / "wide" / "strip.png")
    Image.fromarray(random_image(56, 56)).save(folder / "wide" / "fine.png")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(folder / "dot.png")
    Image.fromarray((np.arange(56 * 84).reshape(56, 84) * 13 % 65536).astype(np.uint16)).save(folder / "g16.png")
    Image.fromarray(random_image(56, 84)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(random_image(56, 84)).convert("P").save(folder / "palette.png")
    frames = [Image.fromarray(random_image(56, 84, seed=s)) for s in (1, 2)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    rotated = Image.fromarray(random_image(56, 84))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated.save(folder / "rotated.jpg", exif=exif)
    (folder / "a_file").write_text("not a folder")
    nan = np.linspace(0, 1, 56 * 84, dtype=np.float32).reshape(56, 84)
    nan[0, :2], nan[5, 5] = np.nan, np.inf
    Image.fromarray(nan, mode="F").save(folder / "nan.tiff")
    return folder


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def explain_argv(files, out, **change):
    options = dict(model=files / "model", image=files / "good.png", prompt=PROMPT, method="GradCAM", layers="1")
    options.update(change)
    argv = ["explain", "--out", out]
    for key, value in options.items():
        if value is True:
            argv.append(f"--{key.replace('_', '-')}")
        elif value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value).format(files=files)]
    return argv


@pytest.mark.parametrize("change, message", [
    (dict(image="{files}/missing.png"), "Image file or folder not found"),
    (dict(image="{files}/broken.png"), "Cannot read"),
    (dict(image="{files}/truncated.png"), "Cannot read"),
    (dict(image="{files}/empty"), "No image files in folder"),
    (dict(image="{files}/wide"), "strip.png is 10000x20 pixels: an aspect ratio over 200"),
    (dict(method="GradCan"), "Unknown method 'GradCan'"),
    (dict(method="FullGrad"), "not supported on vision-language models"),
    (dict(method="SmoothFullGrad"), "not supported on vision-language models"),
    (dict(method="ShapleyCAM", layers="1,2"), "one target layer per call"),
    (dict(layers="9"), "Layer 9 does not exist"),
    (dict(layers="-9"), "Layer -9 does not exist"),
    (dict(layers="3"), "last layer"),
    (dict(layers="deep"), "Unknown layer choice"),
    (dict(layers="1,1"), "names a layer twice"),
    (dict(layers="1,2", mode="comparative"), "at least 3 layers"),
    (dict(n_samples=4), "Smooth methods only"),
    (dict(method="auto", noise_level=0.1), "Smooth methods only"),
    (dict(model="{files}/no_model"), "Model folder not found"),
    (dict(model="{files}/a_file"), "Model folder not found"),
    (dict(prompt=None), "needs --prompt"),
    (dict(texts="a cat"), "--texts is for CLIP"),
    (dict(answer=" "), "--answer is empty"),
    (dict(answer="zebra"), "does not know part of the answer 'zebra'"),
    (dict(answer="red", method="AblationCAM"), "AblationCAM weighs each channel"),
    (dict(per_token=True, method="AblationCAM"), "AblationCAM weighs each channel"),
    (dict(per_token=True, answer="red", layers="0,1"), "--per-token draws one layer"),
    (dict(device="tpu"), "Unknown device 'tpu'"),
    pytest.param(dict(device="mps"), "Device mps is not available here: MPS (Apple's GPU backend) is missing; use "
                 "--device cpu", marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is here")),
    (dict(image="{files}/nan.tiff"), "holds 3 NaN or infinite pixel values"),
    (dict(model="Demo"), "No model 'Demo': did you mean 'demo'"),
    (dict(model="crosess"), "did you mean 'crosses'"),
    (dict(overwrite=True, resume=True), "--overwrite and --resume exclude each other"),
    (dict(device="cuda:0" if not torch.cuda.is_available() else "cuda:99"), "not available"),
])
def test_explain_refuses_with_one_line_and_writes_nothing(capsys, tmp_path, files, change, message):
    code, _, stderr = cli(capsys, *explain_argv(files, tmp_path / "out", **change))
    assert code == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(ERROR) and message in last, stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["explain", "--model", "m"], "required"),
    (["explain", "--n-samples", "0"], "expected a whole number >= 1"),
    (["explain", "--noise-level", "-1"], "fraction of the image's range, 0..1"),
    (["explain", "--noise-level", "5"], "fraction of the image's range, 0..1 (0.15 by default; 0.1-0.2 works best), "
                                        "got 5"),
    (["explain", "--dtype", "float8"], "invalid choice"),
    (["explain", "--mode", "mosaic"], "invalid choice"),
    (["demo", "--n", "0"], "expected a whole number >= 1"),
    (["benchmark", "--model", "demo"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    code, _, stderr = cli(capsys, *argv)
    assert code == 2 and message in stderr


def test_out_that_is_a_file_or_unwritable_is_refused_before_any_work(capsys, files, tmp_path):
    for out, message in ((files / "a_file", "is a file, not a folder"),
                         ("/sys/pytorch_grad_cam_vlm_out", "cannot write in /sys")):
        code, _, stderr = cli(capsys, *explain_argv(files, out))
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert not os.path.exists("/sys/pytorch_grad_cam_vlm_out")
    code, _, stderr = cli(capsys, "demo", "--out", files / "a_file")
    assert code == 2 and "is a file, not a folder" in stderr


def test_out_with_missing_parents_is_created(capsys, files, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    code, _, _ = cli(capsys, *explain_argv(files, out))
    assert code == 0 and (out / "report.csv").is_file()


def test_an_existing_out_folder_is_staged_inside_so_a_mount_point_works(tmp_path):
    """Staging inside an existing --out keeps the final moves on one file system (a Docker volume, a tmpfs)."""
    out = tmp_path / "mounted"
    out.mkdir()
    with staged_output(str(out)) as staging:
        assert os.path.dirname(staging) == str(out)
        open(os.path.join(staging, "map.npy"), "w").write("x")
    assert os.listdir(out) == ["map.npy"]


def test_files_are_copied_when_a_rename_cannot_cross_file_systems(tmp_path, monkeypatch):
    def cross_device(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(os, "replace", cross_device)
    out = tmp_path / "new"
    with staged_output(str(out)) as staging:
        open(os.path.join(staging, "report.csv"), "w").write("ok")
    assert sorted(os.listdir(tmp_path)) == ["new"] and (out / "report.csv").read_text() == "ok"


def test_a_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_output(str(tmp_path / "out")) as staging:
            open(os.path.join(staging, "half.png"), "w").write("x")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["dot.png", "g16.png", "cmyk.jpg", "palette.png", "animated.gif", "rotated.jpg"])
def test_unusual_images_are_explained_as_documented(capsys, tmp_path, files, name):
    code, _, stderr = cli(capsys, *explain_argv(files, tmp_path / "out", image=f"{{files}}/{name}"))
    assert code == 0, stderr
    [row] = json.loads((tmp_path / "out" / "report.json").read_text())
    maps = np.load(tmp_path / "out" / row["files"][1])
    assert maps.shape[0] == 1 and 0 <= maps.min() and maps.max() <= 1
    assert row["note"] == ("animated: the first of 2 frames explained" if name == "animated.gif" else "")


def test_sixteen_bit_images_are_scaled_not_clipped(files):
    raw = np.asarray(Image.open(files / "g16.png"), dtype=np.float64)
    rgb = np.asarray(load_rgb(str(files / "g16.png")))
    np.testing.assert_array_equal(rgb[..., 0], np.round(raw / 257).astype(np.uint8))
    assert (rgb == 255).mean() < 0.01


def test_exif_rotation_and_first_frame(files):
    assert load_rgb(str(files / "rotated.jpg")).size == (56, 84)  # 84x56 stored, shown turned a quarter
    first = np.asarray(Image.open(files / "animated.gif").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_rgb(str(files / "animated.gif"))), first)


def test_offline_hub_id_fails_at_once(capsys, files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, stderr = cli(capsys, *explain_argv(files, tmp_path / "out", model="nobody/no-such-model"))
    assert code == 2 and "HF_HUB_OFFLINE is set" in stderr


def test_pickle_checkpoints_need_allow_pickle(capsys, files, tmp_path):
    folder = tmp_path / "pickled"
    model, processor = build_tiny_model(folder, seed=0)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    os.remove(folder / "model.safetensors")
    out = tmp_path / "out"
    code, _, stderr = cli(capsys, *explain_argv(files, out, model=folder))
    assert code == 2 and "pass --allow-pickle if you trust its source" in stderr and not out.exists()
    code, _, _ = cli(capsys, *explain_argv(files, out, model=folder, allow_pickle=True))
    assert code == 0


# ------------------------------------------------------------------------------------------------ Python API
@pytest.fixture(scope="module")
def api_wrapper(files):
    from pytorch_grad_cam_vlm.models.registry import load_model

    model, processor = load_model(str(files / "model"), "qwen2_5_vl", torch.float32, torch.device("cpu"))
    return QwenVLWrapper(model, processor, prompt=PROMPT)


@pytest.mark.parametrize("make, error, message", [
    (lambda w: QwenVLWrapper(w.model, w.processor, prompt=None), ValueError, "non-empty string"),
    (lambda w: QwenVLWrapper(w.model, w.processor, prompt="  "), ValueError, "non-empty string"),
    (lambda w: QwenVLWrapper(w.model, w.processor, prompt="<|image_pad|> what?"), ValueError, "question alone"),
    (lambda w: QwenVLWrapper(w.model, w.processor, prompt=PROMPT, answer=""), ValueError, "The answer is empty"),
    (lambda w: QwenVLWrapper(w.model, w.processor, prompt=PROMPT, answer_reduction="max"), ValueError,
     "'sum' or 'mean'"),
    (lambda w: w(torch.zeros(1, 3, 56, 56, dtype=torch.uint8)), ValueError, "raw pixels"),
    (lambda w: w(torch.full((1, 3, 56, 56), 200.0)), ValueError, "raw 0..255 pixels"),
    (lambda w: w(torch.zeros(3, 56, 56)), ValueError, r"shape \(B, 3, H, W\)"),
    (lambda w: w(torch.zeros(1, 3, 50, 56)), ValueError, "multiples of 28"),
    (lambda w: w.preprocess("missing.png"), FileNotFoundError, "Image file not found"),
    (lambda w: w.preprocess(np.zeros((8, 8, 3), np.float32)), ValueError, "uint8"),
    (lambda w: w.preprocess(np.zeros((8, 8, 5), np.uint8)), ValueError, "HxWx3"),
    (lambda w: w.preprocess(42), TypeError, "a path, a PIL image"),
    (lambda w: w.answer_logits(torch.zeros(1, 3, 56, 56)), ValueError, "No answer is set"),
    (lambda w: w.token_id(""), ValueError, "non-empty word"),
    (lambda w: WordTarget(w, "zebra"), ValueError, "does not know"),
    (lambda w: SmoothGradCAM(model=w, target_layers=[w.decoder_layers[0]], n_samples=0), ValueError, "n_samples"),
    (lambda w: SmoothGradCAM(model=w, target_layers=[w.decoder_layers[0]], noise_level=-1), ValueError,
     "noise_level"),
    (lambda w: SmoothGradCAM(model=w, target_layers=[w.decoder_layers[0]], average="median"), ValueError,
     "average must be one of"),
    (lambda w: SmoothGradCAM(model=w, target_layers=[w.decoder_layers[0]], batch_size=0), ValueError, "batch_size"),
    (lambda w: select_layers(4, "2,9"), ValueError, "Layer 9 does not exist"),
    (lambda w: layer_sweep(int), TypeError, "does not aggregate target layers"),
    (lambda w: explain(w, torch.zeros(1, 3, 56, 56), method="NoSuchCAM"), InputError, "Unknown method"),
    (lambda w: w.layer(4), ValueError, re.escape("Unknown layer choice 4: use an index into wrapper.layers (0..3, or "
                                                 "negative from the end) or 'projector', as explain's result.layers")),
    (lambda w: w.layer("Projector"), ValueError, "Unknown layer choice 'Projector'"),
    (lambda w: w.layer("1"), ValueError, "Unknown layer choice '1'"),
    (lambda w: explain(w, torch.zeros(1, 3, 56, 56), layers="3"), ValueError, "last layer"),
    (lambda w: explain(w, torch.zeros(1, 3, 56, 56), fractions=(0,)), ValueError, "fractions"),
])
def test_the_python_api_refuses_with_a_clear_error(api_wrapper, make, error, message):
    with pytest.raises(error, match=message):
        make(api_wrapper)


def test_score_cam_shows_no_inner_progress_bars(capsys, tmp_path, files):
    """grad-cam's ScoreCAM draws a bar per batch of channels; the command shows its own bar only (none for one
    image)."""
    code, _, stderr = cli(capsys, *explain_argv(files, tmp_path / "out", method="SmoothScoreCAM", n_samples=2,
                                                layers="0"))
    bars = [line for line in stderr.replace("\r", "\n").splitlines() if "%|" in line
            and not line.startswith("Loading weights")]  # transformers' own bar while loading
    assert code == 0 and bars == [], stderr[-500:]


# ------------------------------------------------------------------------------------------------ issue 27 §5
def listing(folder):
    """Every file under ``folder`` with its bytes, to compare what is on disk before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def four_images(files):
    folder = files / "four"
    folder.mkdir(exist_ok=True)
    for k in range(4):
        Image.fromarray(random_image(56, 84, seed=k)).save(folder / f"img{k}.png")
    return folder


def test_ctrl_c_keeps_the_finished_images_and_says_how_to_resume(capsys, tmp_path, files, four_images, monkeypatch):
    """Ctrl-C after the 2nd of 4 images: exit 130, one line, no traceback; the two finished images and their report
    are in --out (nothing half-written); --resume explains the other two and keeps the first two as they were."""
    from pytorch_grad_cam_vlm.cli import explain as explain_cli

    real, calls = explain_cli.explain_image, []

    def interrupted_third(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            open(os.path.join(args[8], "half_written.png"), "w").write("x")  # the unfinished image's file
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_cli, "explain_image", interrupted_third)
    out = tmp_path / "out"
    code, _, stderr = cli(capsys, *explain_argv(files, out, image=four_images))
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"pytorch-grad-cam-vlm: interrupted after 2 of 4 images: their maps and report are in {out}; to explain the "
        "other 2, rerun the same command with --resume.")
    rows = json.loads((out / "report.json").read_text())
    assert [os.path.basename(r["image"]) for r in rows] == ["img0.png", "img1.png"]
    assert sorted(os.listdir(out)) == sorted(["report.json", "report.csv"] + [f for r in rows for f in r["files"]])
    first = listing(out)

    monkeypatch.setattr(explain_cli, "explain_image", real)
    code, _, stderr = cli(capsys, *explain_argv(files, out, image=four_images, resume=True))
    assert code == 0, stderr
    rows = json.loads((out / "report.json").read_text())
    assert [os.path.basename(r["image"]) for r in rows] == [f"img{k}.png" for k in range(4)]
    after = listing(out)
    assert all(after[name] == data for name, data in first.items() if not name.startswith("report"))
    assert all(os.path.isfile(out / f) for r in rows for f in r["files"])


def test_ctrl_c_before_the_first_image_writes_nothing(capsys, tmp_path, files, four_images, monkeypatch):
    from pytorch_grad_cam_vlm.cli import explain as explain_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(explain_cli, "explain_image", interrupted)
    code, _, stderr = cli(capsys, *explain_argv(files, tmp_path / "out", image=four_images))
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "pytorch-grad-cam-vlm: interrupted; unfinished output was not kept."
    assert os.listdir(tmp_path) == []


def test_a_rerun_into_results_is_refused_and_overwrite_replaces_them(capsys, tmp_path, files):
    """A second run into an --out with a report refuses (nothing touched); --overwrite replaces the earlier run's
    files (those its report lists: old figures do not stay beside new ones) and keeps the user's own files."""
    out = tmp_path / "out"
    assert cli(capsys, *explain_argv(files, out, layers="1"))[0] == 0
    (out / "my_notes.txt").write_text("mine")
    before = listing(out)
    code, _, stderr = cli(capsys, *explain_argv(files, out, layers="0"))
    assert code == 2 and stderr.strip() == (
        f"{ERROR}--out {out} already holds results (report.json): pass --overwrite to replace them, --resume to "
        "explain only the images missing from them, or choose another folder.")
    assert listing(out) == before
    code, _, stderr = cli(capsys, *explain_argv(files, out, layers="0", overwrite=True))
    assert code == 0, stderr
    [row] = json.loads((out / "report.json").read_text())
    assert row["layers"] == [0]
    assert sorted(os.listdir(out)) == sorted(["report.json", "report.csv", "my_notes.txt"] + row["files"])


@pytest.mark.parametrize("size, warned", [((1, 1), "dot.png is 1x1 pixels; the model sees it upscaled 56 times to "
                                                    "56x56"), ((5, 5), "upscaled 11 times"), ((56, 84), None)])
def test_a_tiny_image_is_explained_with_a_warning(capsys, tmp_path, files, size, warned):
    Image.fromarray(random_image(*size)).save(tmp_path / "dot.png")
    code, _, stderr = cli(capsys, *explain_argv(files, tmp_path / "out", image=tmp_path / "dot.png"))
    assert code == 0, stderr
    [row] = json.loads((tmp_path / "out" / "report.json").read_text())
    if warned:
        assert warned in stderr and warned in row["warning"]
    else:
        assert "upscaled" not in stderr


def test_cli_warnings_are_one_line_each(capsys, tmp_path, files):
    """Control tokens in the prompt, and --mode given with --per-token, are warned about on one line each."""
    code, _, stderr = cli(capsys, *explain_argv(files, tmp_path / "a", prompt="What color?<|im_end|>"))
    assert code == 0
    assert ("pytorch-grad-cam-vlm: warning: The prompt contains the chat template's control tokens ['<|im_end|>']: "
            "the wrapper already puts the question inside the chat template") in stderr
    code, _, stderr = cli(capsys, *explain_argv(files, tmp_path / "b", per_token=True, answer="red", mode="grid"))
    assert code == 0
    assert ("pytorch-grad-cam-vlm: warning: --mode grid is left out with --per-token, which draws one figure of every "
            "answer token's map.") in stderr.splitlines()
    assert "UserWarning" not in stderr


def test_explain_help_names_the_embedded_models(capsys):
    code, stdout, _ = cli(capsys, "explain", "--help")
    from pytorch_grad_cam_vlm.demo import EMBEDDED_MODELS

    names = ", ".join(list(EMBEDDED_MODELS)[:-1]) + f" or {list(EMBEDDED_MODELS)[-1]}"
    assert code == 0 and f"--model MODEL {names} (the embedded" in " ".join(stdout.split())
    assert "demo, crosses" in names
    assert "(the embedded demo models, no download)" in " ".join(stdout.split())


def test_a_hub_id_that_does_not_exist_fails_at_once(capsys, files, tmp_path, monkeypatch):
    """One look-up on the hub, no download and its minute of retries: a missing model and an unreachable hub each
    get one line."""
    import huggingface_hub
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import AutoConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("the config was downloaded"))
    request = httpx.Request("GET", "https://huggingface.co/api/models/nobody/no-such-model")

    def missing(name, timeout=None):
        raise RepositoryNotFoundError("404", response=httpx.Response(404, request=request))

    def offline(name, timeout=None):
        raise httpx.ConnectError("[Errno -2] Name or service not known", request=request)

    for lookup, message in ((missing, "Model 'nobody/no-such-model' is not a local folder, and the Hugging Face hub "
                                      "has no model of that name (or it is private: log in with `hf auth login`); "
                                      "check the spelling."),
                            (offline, "Model 'nobody/no-such-model' is not a local folder nor in the Hugging Face "
                                      "cache, and the hub cannot be reached ([Errno -2] Name or service not known): "
                                      "check the network, or pass a local folder.")):
        monkeypatch.setattr(huggingface_hub, "model_info", lookup)
        code, _, stderr = cli(capsys, *explain_argv(files, tmp_path / "out", model="nobody/no-such-model"))
        assert code == 2 and stderr.strip() == ERROR + message
    assert os.listdir(tmp_path) == []


def test_the_report_is_strict_json(tmp_path):
    """NaN and infinities become null, which JSON.parse reads (it refuses NaN)."""
    from pytorch_grad_cam_vlm.cli.common import write_report

    write_report([dict(image="a.png", check=[float("nan"), 0.5], peak_drop=float("inf"), files=[])], str(tmp_path))

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    [row] = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert row["check"] == [None, 0.5] and row["peak_drop"] is None


def test_api_bad_targets_and_pixels(api_wrapper, capsys):
    """explain() with fewer or more targets than images, a token id beyond the vocabulary, and NaN / infinite
    pixels: each a clear ValueError (grad-cam printed "An exception occurred in CAM" and failed to stack)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = api_wrapper.preprocess(random_image(56, 84))
    two = torch.cat([x, x])
    target = ClassifierOutputTarget(3)
    for images, targets, message in ((two, [target], "Got 1 target(s) for 2 image(s)"),
                                     (x, [target, target], "Got 2 target(s) for 1 image(s)"),
                                     (x, [], "Got 0 target(s) for 1 image(s)")):
        with pytest.raises(ValueError, match=re.escape(message + ": pass one target per image")):
            explain(api_wrapper, images, targets, method="GradCAM", layers="1")
    vocabulary = api_wrapper.model.get_output_embeddings().out_features
    with pytest.raises(ValueError, match=re.escape(f"Target ClassifierOutputTarget({vocabulary}) lies outside the "
                                                   f"model's output of {vocabulary} column(s)")):
        explain(api_wrapper, x, [ClassifierOutputTarget(vocabulary)], method="GradCAM", layers="1")
    assert "exception occurred" not in capsys.readouterr().out
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[0, 0, 3, 4] = bad
        with pytest.raises(ValueError, match="The images hold 1 NaN or infinite values"):
            api_wrapper(y)


def test_api_warnings(api_wrapper, tmp_path):
    with pytest.warns(UserWarning, match=re.escape("control tokens ['<|im_end|>', '<|im_start|>']")):
        QwenVLWrapper(api_wrapper.model, api_wrapper.processor, prompt="Hi<|im_end|><|im_start|>What color?")
    from pytorch_grad_cam_vlm import CLIPWrapper, build_tiny_clip

    model, processor = build_tiny_clip(tmp_path / "clip")
    with pytest.warns(UserWarning, match="CLIP with one text: its softmax over the texts is 1.0 whatever the image"):
        CLIPWrapper(model, processor, texts=["a red circle"])


def test_layer_turns_a_chosen_layer_into_its_module(api_wrapper):
    """wrapper.layer takes what explain's result.layers holds, an index or "projector"."""
    assert api_wrapper.layer("projector") is api_wrapper.projector is api_wrapper.merger
    assert api_wrapper.layer(1) is api_wrapper.decoder_layers[1] and api_wrapper.layer(np.int64(-1)) is \
        api_wrapper.decoder_layers[-1]
