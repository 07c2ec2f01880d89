"""``pytorch-grad-cam-vlm app`` end to end: a server on the demo model started by the tests (127.0.0.1, a free port,
``--stop-after`` so that it ends by itself), driven through Gradio's own client and through a headless Chromium. Its
maps equal the CLI's and the package's reference computations; bad input gets one message and the server carries
on; it listens on loopback only unless told, and leaves nothing behind."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import QwenVLWrapper
from pytorch_grad_cam_vlm.cli import main
from pytorch_grad_cam_vlm.cli.app import check_exposure, interruptible, is_loopback
from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples
from pytorch_grad_cam_vlm.methods.answers import explain_generated, generate_answer
from pytorch_grad_cam_vlm.methods.auto import explain
from pytorch_grad_cam_vlm.methods.catalog import resolve_method
from pytorch_grad_cam_vlm.metrics.deletion_check import check_maps

if importlib.util.find_spec("gradio") is None:  # found, not imported: Gradio reads its temporary folder on import
    pytest.skip("the app extra is not installed: pip install -e \".[test]\"", allow_module_level=True)
gradio_client = pytest.importorskip("gradio_client")
import httpx  # noqa: E402  (installed with gradio)
from browser import CHROMIUM, Chromium  # noqa: E402

SAMPLE = make_demo_samples(1, seed=0, split="test")[0]  # the page's first example
OUTPUTS = ("overlay", "heatmap", "summary", "details", "strip", "tokens", "downloads")
MAX_UPLOAD_MB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on the demo model in its own process, with its own temporary folder and working folder (both
    checked to be empty once it stopped). Yields ``(url, process)``."""
    root = tmp_path_factory.mktemp("app_server")
    temp, cwd = root / "tmp", root / "cwd"
    temp.mkdir()
    cwd.mkdir()
    port = free_port()
    env = dict(os.environ, TMPDIR=str(temp), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = open(root / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "pytorch_grad_cam_vlm", "app", "--model", "demo", "--port",
                                str(port), "--max-upload-mb", str(MAX_UPLOAD_MB), "--stop-after", "900"],
                               cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while "runs at" not in (root / "server.log").read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the app did not start:\n{(root / 'server.log').read_text()}")
        time.sleep(0.25)
    yield url, process
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()
    output = (root / "server.log").read_text()
    assert "The explorer stopped." in output, output
    assert os.listdir(temp) == [] and os.listdir(cwd) == [], "the app left files behind"


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return gradio_client.Client(server[0], download_files=str(tmp_path_factory.mktemp("downloads")), verbose=False)


@pytest.fixture(scope="module")
def sample_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "sample.png"
    Image.fromarray(SAMPLE.image).save(path)
    return str(path)


@pytest.fixture(scope="module")
def demo():
    """The demo model loaded in the test's process, for reference computations."""
    return load_demo_model()


def ask(client, image, prompt=SAMPLE.prompt, answer="", method="auto", layer=None, target="decoder", n_samples=50,
        noise_level=0.15, per_token=False) -> dict:
    """One explanation through the page's API, its outputs by name."""
    values = client.predict(gradio_client.handle_file(image), prompt, answer, method, layer is None, layer or 0,
                            target, n_samples, noise_level, per_token, api_name="/explain")
    return dict(zip(OUTPUTS, values))


def download(result, suffix):
    (path,) = [p for p in result["downloads"] if p.endswith(suffix)]
    return path


@pytest.mark.parametrize("page, flags", [
    (dict(), []),
    (dict(method="SmoothGradCAM", layer=1, n_samples=4, noise_level=0.1),
     ["--method", "SmoothGradCAM", "--layers", "1", "--n-samples", "4", "--noise-level", "0.1"]),
], ids=["auto", "smooth-layer-1"])
def test_explain_equals_the_cli(client, sample_png, tmp_path, capsys, page, flags):
    result = ask(client, sample_png, **page)
    assert main(["explain", "--model", "demo", "--image", sample_png, "--prompt", SAMPLE.prompt, "--out",
                 str(tmp_path / "cli"), *flags]) == 0
    capsys.readouterr()
    (row,) = json.loads((tmp_path / "cli" / "report.json").read_text())
    name = page.get("method", "auto")
    cli_map = np.load(tmp_path / "cli" / f"sample_{name}_maps.npy")
    np.testing.assert_allclose(np.load(download(result, "_map.npy")), cli_map, atol=1e-5)
    overlay_png = tmp_path / "cli" / f"sample_{name}_layer{row['layers'][0]}_overlay.png"
    for shown in (result["overlay"], download(result, "_overlay.png")):
        assert np.array_equal(np.asarray(Image.open(shown).convert("RGB")), np.asarray(Image.open(overlay_png)))
    details = result["details"]
    assert (details["method"], [details["layer"]], details["predicted_token"]) == (row["method"], row["layers"],
                                                                                  row["predicted_token"])
    assert details["probability"] == pytest.approx(row["probability"], abs=1e-6)
    assert details["check"] == pytest.approx(row["check"][0], abs=1e-6) and details["verdict"] == row["verdict"][0]
    assert f"{details['check']:+.3g}" in result["summary"]
    assert details["prompt_words"] == row["prompt_words"] == SAMPLE.prompt.split() and "Prompt words" in result["summary"]
    np.testing.assert_allclose(details["word_occlusion"], row["word_occlusion"], atol=1e-5)
    # the strip: the chosen method at every usable decoder layer (0..2; the last one gets no gradient)
    assert details["strip_layers"] == [0, 1, 2] and len(result["strip"]) == 3
    assert details["strip_checks"][details["layer"]] == pytest.approx(details["check"])
    if "layer" in page:  # one candidate layer: the strip's other layers come from a sweep, unchecked
        assert [k for k, c in zip(details["strip_layers"], details["strip_checks"]) if c is not None] == [1]


def test_per_token_maps_equal_explain_generated(client, sample_png, demo):
    result = ask(client, sample_png, per_token=True)
    details = result["details"]
    wrapper = QwenVLWrapper(*demo, prompt=SAMPLE.prompt)
    x = wrapper.preprocess(sample_png)
    answer = generate_answer(wrapper, x, 16)
    wrapper.set_answer(answer)
    whole = explain(wrapper, x)  # the whole answer's map, chosen by the deletion check
    wrapper.set_answer(None)
    assert (details["method"], details["layer"]) == (whole.methods[0], whole.layers[0])
    assert details["check"] == pytest.approx(whole.checks[0].score, abs=1e-6)
    np.testing.assert_allclose(np.load(download(result, "_map.npy"))[0], whole.maps[0], atol=1e-5)
    reference = explain_generated(wrapper, x, [wrapper.decoder_layers[whole.layers[0]]],
                                  method=resolve_method(whole.methods[0]))
    assert details["tokens"] == reference.tokens and len(details["tokens"]) == len(answer)
    np.testing.assert_allclose(details["token_probabilities"], reference.probabilities, atol=1e-6)
    np.testing.assert_allclose(np.load(download(result, "_per_token.npy")), reference.maps, atol=1e-5)
    chips = result["tokens"]["choices"]
    assert len(chips) == len(answer) + 1 and result["tokens"]["visible"]


def test_vision_encoder_map_equals_grad_cam_on_the_block(client, sample_png, demo):
    result = ask(client, sample_png, method="GradCAM", layer=1, target="vision encoder")
    wrapper = QwenVLWrapper(*demo, prompt=SAMPLE.prompt)
    x = wrapper.preprocess(sample_png)
    with torch.no_grad():
        token = int(wrapper(x)[0].argmax())
    target = ClassifierOutputTarget(token)
    with GradCAM(model=wrapper, target_layers=[wrapper.vision_blocks[1]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        reference = cam(input_tensor=x, targets=[target])
    np.testing.assert_allclose(np.load(download(result, "_map.npy")), reference, atol=1e-5)
    details = result["details"]
    assert (details["method"], details["layer"], details["target"]) == ("GradCAM", 1, "vision encoder")
    # The server computes on one thread, this process on several: the maps agree to 1e-5 (above), and so their checks
    # (measured 1.4e-6 apart).
    assert details["check"] == pytest.approx(check_maps(wrapper, x, reference, target)[0].score, abs=1e-5)
    assert details["strip_layers"] == [0, 1, 2, 3]  # every vision block feeds the merger


@pytest.mark.parametrize("case, message", [
    ("not an image", "is not an image this page can read"),
    ("empty prompt", "Type a question in the prompt box."),
    ("layer out of range", "Layer 9 does not exist: the model has layers 0..3."),
    ("last layer", "Layer 3 is the last layer"),
    ("unknown method", "Unknown method 'Nope'"),
])
def test_bad_input_gets_one_message_and_the_server_carries_on(client, server, sample_png, tmp_path, case, message):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image, whatever its name says")
    kwargs = {"not an image": dict(image=str(notes)), "empty prompt": dict(prompt="   "),
              "layer out of range": dict(layer=9), "last layer": dict(layer=3),
              "unknown method": dict(method="Nope")}[case]
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        ask(client, **{"image": sample_png, **kwargs})
    assert str(error.value).count(message) == 1 and "\n" not in str(error.value)
    assert server[1].poll() is None
    assert ask(client, sample_png)["details"]["predicted_token"] == SAMPLE.answer


def test_files_not_uploaded_and_large_uploads_are_refused(server, tmp_path):
    api = server[0] + "gradio_api"
    outside = tmp_path / "outside.png"
    Image.fromarray(SAMPLE.image).save(outside)
    for image, message in (({"path": str(outside), "meta": {"_type": "gradio.FileData"}}, "not uploaded by a user"),
                           (str(outside), "ImageData")):
        event = httpx.post(f"{api}/call/explain", json={"data": [
            image, SAMPLE.prompt, "", "auto", True, 0, "decoder", 50, 0.15, False]}).json()["event_id"]
        reply = httpx.get(f"{api}/call/explain/{event}", timeout=60).text
        assert "event: error" in reply and message in reply, reply
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 1))
    with open(big, "rb") as f:
        response = httpx.post(f"{api}/upload", files={"files": ("big.png", f, "image/png")}, timeout=60)
    assert response.status_code == 413


def test_clip_captions_equal_the_cli(sample_png, tmp_path, capsys):
    """The page logic without a server: a CLIP model takes captions (one per line) and explains its vision layers
    as ``explain --texts`` does."""
    from pytorch_grad_cam_vlm.cli.explorer import Explorer, Request, explain_request
    from pytorch_grad_cam_vlm.errors import InputError
    from pytorch_grad_cam_vlm.models.registry import load_model
    from pytorch_grad_cam_vlm.models.tiny.clip import build_tiny_clip

    build_tiny_clip(tmp_path / "clip", family="clip")
    explorer = Explorer(*load_model(str(tmp_path / "clip"), "clip", torch.float32, torch.device("cpu")), "clip",
                        "tiny clip", str(tmp_path / "work"))
    assert explorer.targets == ("vision encoder",)
    result = explain_request(explorer, Request(sample_png, "a red circle\na red triangle\n", target="vision encoder"))
    assert main(["explain", "--model", str(tmp_path / "clip"), "--image", sample_png, "--texts", "a red circle",
                 "a red triangle", "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    (row,) = json.loads((tmp_path / "cli" / "report.json").read_text())
    np.testing.assert_allclose(np.load(result["files"][0]), np.load(tmp_path / "cli" / "sample_auto_maps.npy"),
                               atol=1e-5)
    assert (result["predicted_token"], result["method"], [result["layer"]]) == (row["predicted_token"], row["method"],
                                                                                row["layers"])
    for request, message in ((Request(sample_png, "a red circle", target="vision encoder"), "two different captions"),
                             (Request(sample_png, "a\nb", target="decoder"), "has no decoder layers"),
                             (Request(sample_png, "a\nb", target="vision encoder", per_token=True), "no answer")):
        with pytest.raises(InputError, match=message):
            explain_request(explorer, request)


def test_requests_to_the_model_run_one_at_a_time(demo, sample_png, tmp_path, monkeypatch):
    from pytorch_grad_cam_vlm.cli.app import write_examples
    from pytorch_grad_cam_vlm.cli.explorer import Explorer, Request, explain_request

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # where Gradio writes, if imported first here
    from pytorch_grad_cam_vlm.cli.explorer_page import build_page

    explorer = Explorer(*demo, "qwen2_5_vl", "demo", str(tmp_path))
    spans = []

    def request():
        marks = []
        explain_request(explorer, Request(sample_png, SAMPLE.prompt, method="GradCAM"),
                        lambda fraction, text: marks.append(time.monotonic()))
        spans.append((marks[0], marks[-1]))

    threads = [threading.Thread(target=request) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    spans.sort()
    assert len(spans) == 3 and all(first[1] < second[0] for first, second in zip(spans, spans[1:]))
    # and the page queues every event that runs the model in one queue of one
    page = build_page(explorer, write_examples(str(tmp_path / "examples")))
    model_events = [fn for fn in page.fns.values() if fn.name in ("explain_page", "switch_target")]
    assert len(model_events) == 3 and {(fn.concurrency_id, fn.concurrency_limit) for fn in model_events} == {
        ("model", 1)}


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("192.168.1.20", False), ("example.org", False)])
def test_only_loopback_counts_as_local(host, loopback):
    assert is_loopback(host) is loopback


def test_ctrl_c_stops_the_app_when_the_shell_started_it_in_the_background():
    """A non-interactive shell starts background jobs with SIGINT ignored, and Python keeps ignoring it: the app then
    never stopped on Ctrl-C (found when the suite ran as `(pytest &)`: the server fixture's SIGINT went unheard)."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt):
            with interruptible():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the signal arrives at once; a handler that ignored it would let this run out
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the handler before, put back
    finally:
        signal.signal(signal.SIGINT, before)


def test_public_host_or_share_needs_allow_public(capsys):
    for argv in (["--host", "0.0.0.0"], ["--share"]):
        assert main(["app", *argv]) == 2
        assert "--allow-public" in capsys.readouterr().err
    assert check_exposure("127.0.0.1", False, False) is None
    assert "anyone who can reach it" in check_exposure("0.0.0.0", True, True)


def test_without_gradio_the_app_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['gradio'] = None; from pytorch_grad_cam_vlm.cli import main; "
            "sys.exit(main(['app', '--model', 'demo']))")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TMPDIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        'pytorch-grad-cam-vlm: error: The explorer needs Gradio: pip install "pytorch-grad-cam-vlm[app]".')
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)")
def test_page_in_headless_chromium(server, tmp_path):
    """Load the page, click Explain with no image (one message), click the first example and Explain, then a layer
    of the strip, then a token of the generated answer; the overlay shows the map at the image's size, and the page
    loads nothing from elsewhere."""
    url = server[0]
    browser = Chromium()
    try:
        browser.call("Page.navigate", url=url)
        browser.wait_for("document.querySelectorAll('#examples img').length === 3 && "
                         "Array.from(document.querySelectorAll('#examples img')).every(i => i.complete)")
        browser.click("#explain-button")
        toasts = browser.wait_for("Array.from(document.querySelectorAll('.toast-body')).map(t => t.innerText)")
        assert len(toasts) == 1 and "Upload an image first" in toasts[0]
        browser.click("#examples tbody tr")
        browser.wait_for("document.querySelector('#prompt textarea').value.length > 0 && "
                         "document.querySelector('#image img') !== null")
        browser.click("#explain-button")
        size = browser.wait_for("(() => { const i = document.querySelector('#overlay img'); return i && i.complete && "
                                "i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null; })()")
        assert size == list(SAMPLE.image.shape[1::-1])  # 112 x 112, a multiple of the 28-pixel token cell
        assert "Predicted triangle" in browser.wait_for("document.querySelector('#summary').innerText")
        browser.wait_for("document.querySelectorAll('#layer-strip .thumbnail-item').length === 3")
        browser.click("#layer-strip .thumbnail-item", 2)
        browser.wait_for("document.querySelector('#summary').innerText.includes('decoder layer 2')")
        assert browser.evaluate("document.querySelector('#layer input[type=number]').value") == "2"
        assert browser.evaluate("document.querySelector('#auto-layer input').checked") is False
        browser.click("#per-token input")  # the generated answer: one chip per token, each showing its map
        browser.click("#explain-button")
        browser.wait_for("document.querySelectorAll('#tokens label').length === 17")  # whole answer + 16 tokens
        shown = browser.evaluate("document.querySelector('#overlay img').src")
        browser.click("#tokens label", 1)
        browser.wait_for(f"document.querySelector('#overlay img').src !== {json.dumps(shown)}")
        shot = browser.screenshot(str(tmp_path / "explorer.png"))
        assert Image.open(shot).size[0] == 1280
    finally:
        browser.close()
    elsewhere = [u for u in browser.requests if not u.startswith((url, "data:", "blob:"))]
    assert browser.requests and elsewhere == []
