"""The faithfulness benchmark: data checks, scores against references, resume, sharding, fast ROAD, demo model."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from pytorch_grad_cam_vlm import build_tiny_model, cli
from pytorch_grad_cam_vlm.benchmark import data as bench_data
from pytorch_grad_cam_vlm.benchmark import runner
from pytorch_grad_cam_vlm.cli.benchmark import options_from
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.metrics import sanity
from pytorch_grad_cam_vlm.metrics.deletion_check import ranked_map
from pytorch_grad_cam_vlm.metrics.localization import energy_in_box, energy_in_boxes
from pytorch_grad_cam_vlm.models.registry import make_subject

PROMPT = "What color is the circle?"
BASE_ARGS = ["--layers", "1", "--methods", "GradCAM", "--percentiles", "10,60"]


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical results need one thread count


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_benchmark_model")
    build_tiny_model(path, seed=0)
    return str(path)


def write_data(folder, rows, size=(56, 84)):
    """Images im0.png, im1.png, ... of ``size`` (HxW) and a data.jsonl of ``rows`` (dicts without image)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            image = (np.random.RandomState(i).rand(*size, 3) * 255).astype(np.uint8)
            Image.fromarray(image).save(os.path.join(folder, f"im{i}.png"))
            f.write(json.dumps(dict(image=f"im{i}.png", **row)) + "\n")
    return path


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    rows = [dict(prompt=PROMPT, boxes=[[0, 0, 28, 28]], distractor_boxes=[[56, 28, 84, 56]]),
            dict(prompt=PROMPT, answer="red", boxes=[[28, 0, 84, 28], [0, 28, 28, 56]]),
            dict(prompt="Describe this image", answer="blue")]
    return write_data(str(tmp_path_factory.mktemp("bench_data")), rows)


def options(argv):
    """The benchmark options the command line makes of ``argv``."""
    return options_from(cli.build_parser().parse_args(["benchmark"] + argv))


def run_main(argv, capsys):
    code = cli.main(["benchmark"] + argv)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("rows, edit, message", [
    ([dict(prompt=PROMPT)] * 2, lambda folder: os.remove(os.path.join(folder, "im1.png")),
     "data.jsonl line 2: Image file not found: "),
    ([dict(prompt=PROMPT, boxes=[[0, 0, 28, 28]]), dict(prompt=PROMPT, boxes=[[60, 0, 90, 28]])], None,
     "data.jsonl line 2: boxes: box [60, 0, 90, 28] lies outside the 84x56 image (width x height)."),
    ([dict(prompt=PROMPT, distractor_boxes=[[10, 10, 5, 20]])], None,
     "data.jsonl line 1: distractor_boxes: box [10, 10, 5, 20] is empty or reversed"),
    ([dict(prompt=PROMPT), dict(prompt="")], None, "data.jsonl line 2: missing 'prompt'"),
    ([dict(prompt=PROMPT, answers="red")], None, "data.jsonl line 1: unknown keys ['answers']"),
])
def test_bad_rows_are_named_and_nothing_is_written(tmp_path, tiny_path, capsys, rows, edit, message):
    path = write_data(str(tmp_path / "data"), rows)
    if edit:
        edit(str(tmp_path / "data"))
    code, err = run_main(["--model", tiny_path, "--data", path, "--out", str(tmp_path / "out")] + BASE_ARGS, capsys)
    assert code == 2 and message in err
    assert not os.path.exists(tmp_path / "out")


def test_invalid_json_line_and_unknown_answer_word(tmp_path, tiny_path, capsys):
    path = write_data(str(tmp_path / "data"), [dict(prompt=PROMPT)])
    with open(path, "a") as f:
        f.write("{not json\n")
    code, err = run_main(["--model", tiny_path, "--data", path, "--out", str(tmp_path / "out")] + BASE_ARGS, capsys)
    assert code == 2 and "data.jsonl line 2: not valid JSON" in err
    path = write_data(str(tmp_path / "data2"), [dict(prompt=PROMPT, answer="zebra")])
    code, err = run_main(["--model", tiny_path, "--data", path, "--out", str(tmp_path / "out")] + BASE_ARGS, capsys)
    assert code == 2 and "data.jsonl line 1: the tokenizer does not know the start of the answer 'zebra'" in err


def test_coco_file_gives_one_sample_per_image_and_category(tmp_path):
    folder = write_data(str(tmp_path), [dict(prompt=PROMPT)] * 2)
    coco = dict(images=[dict(id=7, file_name="im0.png"), dict(id=9, file_name="im1.png")],
                categories=[dict(id=1, name="cat"), dict(id=2, name="dog")],
                annotations=[dict(image_id=7, category_id=1, bbox=[10, 5, 20, 30]),
                             dict(image_id=7, category_id=2, bbox=[40, 0, 10, 10]),
                             dict(image_id=9, category_id=2, bbox=[0, 0, 84, 56])])
    path = os.path.join(os.path.dirname(folder), "coco.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    samples = bench_data.load_samples(path)
    assert [(s.index, os.path.basename(s.image), s.prompt, s.boxes, s.distractor_boxes) for s in samples] == [
        (0, "im0.png", "Is there a cat in this image?", [(10, 5, 30, 35)], [(40, 0, 50, 10)]),
        (1, "im0.png", "Is there a dog in this image?", [(40, 0, 50, 10)], [(10, 5, 30, 35)]),
        (2, "im1.png", "Is there a dog in this image?", [(0, 0, 84, 56)], []),
    ]
    coco["annotations"][2]["bbox"] = [0, 0, 85, 56]
    with open(path, "w") as f:
        json.dump(coco, f)
    with pytest.raises(InputError, match=r"coco.json images\[1\] \(id 9, category 'dog'\): boxes: box "
                                                   r"\[0, 0, 85, 56\] lies outside the 84x56 image"):
        bench_data.load_samples(path)


def test_demo_dataset_round_trips(tmp_path):
    from pytorch_grad_cam_vlm.demo import make_demo_samples

    samples = bench_data.load_samples(bench_data.write_demo_dataset(str(tmp_path), 3, seed=4))
    for sample, demo in zip(samples, make_demo_samples(3, seed=4)):
        assert np.array_equal(np.asarray(Image.open(sample.image)), demo.image)
        assert (sample.prompt, sample.answer) == (demo.prompt, demo.answer)
        assert sample.boxes == [demo.evidence_box] and sample.distractor_boxes == demo.distractor_boxes


# ------------------------------------------------------------------------------------------------ scores
def test_energy_in_boxes_counts_overlaps_once_and_equals_energy_in_box_for_one_box():
    cam = np.random.RandomState(0).randn(30, 40)
    assert energy_in_boxes(cam, [(3, 4, 20, 25)]) == pytest.approx(energy_in_box(cam, (3, 4, 20, 25)))
    positive = np.clip(cam, 0, None)
    union = positive[0:10, 0:10].sum() + positive[0:10, 10:15].sum() + positive[10:20, 5:15].sum()
    assert energy_in_boxes(cam, [(0, 0, 10, 10), (5, 0, 15, 20)]) == pytest.approx(union / positive.sum())


def test_spearman_and_box_scaling():
    from scipy.stats import spearmanr

    rng = np.random.RandomState(1)
    a, b = rng.rand(8, 8), rng.rand(8, 8)
    b[:2] = b[0, 0]  # ties
    assert sanity.spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0])
    assert np.isnan(sanity.spearman(a, np.ones((8, 8))))
    assert bench_data.pixel_boxes([(10, 5, 21, 30)], 0.5, 2.0) == [(5, 10, 11, 60)]


def test_ranked_map_removes_exact_shares_where_the_threshold_removes_everything():
    cam = np.zeros((10, 10), dtype=np.float32)
    cam[:3] = np.arange(30).reshape(3, 10) + 1  # 70% of the map is 0, as after grad-cam's ReLU
    ranked = ranked_map(cam, np.random.default_rng(0))
    kept = lambda m, p: int((m < np.percentile(m, p)).sum())  # RemoveMostRelevantFirst's mask
    assert kept(cam, 50) == 0 and kept(ranked, 50) == 50
    assert np.array_equal(np.argsort(ranked[:3].ravel()), np.arange(30))  # distinct values keep their order
    assert ranked[3:].max() < ranked[:3].min()
    assert np.array_equal(ranked, ranked_map(cam, np.random.default_rng(0)))


def test_randomized_copy_changes_decoder_and_head_only(tiny_qwen):
    model, processor = tiny_qwen
    wrapper = make_subject("qwen2_5_vl", model, processor, PROMPT, None).wrapper
    before = {n: p.clone() for n, p in model.named_parameters()}
    randomized = sanity.randomized_copy(model, wrapper.decoder_layers, seed=3)
    again = dict(sanity.randomized_copy(model, wrapper.decoder_layers, seed=3).named_parameters())
    for name, parameter in randomized.named_parameters():
        assert torch.equal(model.get_parameter(name), before[name])  # the trained model is untouched
        assert torch.equal(parameter, again[name])  # seeded
        changed = not torch.equal(parameter, before[name])
        in_decoder = ".language_model.layers." in name or name.startswith("lm_head")
        if parameter.dim() >= 2:
            assert changed == in_decoder, name
            if in_decoder:
                assert abs(parameter.std().item() - model.config.text_config.initializer_range) < 0.005
        elif not in_decoder:
            assert not changed, name


# ------------------------------------------------------------------------------------------------ ROAD
def test_fast_imputer_equals_grad_cam(tmp_path):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    from pytorch_grad_cam_vlm.metrics.road import FastNoisyLinearImputer

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(3, 56, 112)).astype(np.float32))
    cam = np.kron(rng.random((4, 8)), np.ones((14, 14))).astype(np.float32) + rng.random((56, 112)) * 1e-3
    for percentile in (10, 35, 90):
        mask = torch.from_numpy(np.float32(cam < np.percentile(cam, percentile)))
        outputs = []
        for imputer in (NoisyLinearImputer(), FastNoisyLinearImputer()):
            torch.manual_seed(percentile)
            outputs.append(imputer(image, mask))
        assert (outputs[0] - outputs[1]).abs().max() < 1e-4
        assert torch.equal(outputs[0][:, mask.bool()], image[:, mask.bool()])  # kept pixels stay


def test_fast_road_combined_equals_grad_cam():
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pytorch_grad_cam_vlm.metrics.road import FastROADCombined

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    x = torch.randn(2, 3, 28, 42)
    cams = np.random.RandomState(0).rand(2, 28, 42).astype(np.float32)
    targets = [ClassifierOutputTarget(1), ClassifierOutputTarget(3)]
    scores = []
    for metric in (ROADCombined([20, 50, 80]), FastROADCombined([20, 50, 80])):
        torch.manual_seed(1)
        scores.append(metric(x, cams, targets, model))
    assert np.abs(scores[0] - scores[1]).max() < 1e-4 and np.abs(scores[0]).max() > 1e-3


# ------------------------------------------------------------------------------------------------ runs
def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_path, data_path):
    """An uninterrupted single-process run: its output folder."""
    out = str(tmp_path_factory.mktemp("bench_full") / "out")
    assert cli.main(["benchmark", "--model", tiny_path, "--data", data_path, "--out", out, "--seed", "5"] + BASE_ARGS) == 0
    return out


def test_rows_scores_and_outputs(full_run, tiny_path):
    rows = read_csv(os.path.join(full_run, "per_sample.csv"))
    assert [(r["sample"], r["method"], r["layer"]) for r in rows] == [
        (str(s), m, "1") for s in range(3) for m in ("GradCAM", "RandomCAM")]
    for row in rows:
        morf = [float(row["morf_removed_90"]), float(row["morf_removed_40"])]  # grad-cam's percentiles 10, 60
        lerf = [float(row["lerf_removed_90"]), float(row["lerf_removed_40"])]
        assert float(row["road_combined"]) == pytest.approx((np.mean(lerf) - np.mean(morf)) / 2, abs=2e-6)
        assert -1 <= float(row["sanity"]) <= 1 or row["sanity"] == "nan"
    # Sample 1 has an answer ("red": its first token is the target), sample 2 has no boxes.
    red = AutoTokenizer.from_pretrained(tiny_path).convert_tokens_to_ids("red")
    assert {r["target_token"] for r in rows if r["sample"] == "1"} == {str(red)}
    assert all(r["pointing"] == r["energy"] == r["distractor"] == "" for r in rows if r["sample"] == "2")
    assert all(r["distractor"] == "" and r["pointing"] in "01" for r in rows if r["sample"] == "1")
    summary = read_csv(os.path.join(full_run, "summary.csv"))
    grad = next(r for r in summary if r["method"] == "GradCAM")
    grad_rows = [r for r in rows if r["method"] == "GradCAM"]
    assert float(grad["road_combined"]) == pytest.approx(np.mean([float(r["road_combined"]) for r in grad_rows]),
                                                         rel=1e-5)
    assert float(grad["pointing"]) == pytest.approx(np.mean([float(r["pointing"]) for r in grad_rows[:2]]))
    with open(os.path.join(full_run, "benchmark.md")) as f:
        table = f.read()
    assert (f"| GradCAM | 1 | {float(grad['road_combined']):.3f} [{float(grad['road_combined_low']):.3f}, "
            f"{float(grad['road_combined_high']):.3f}] |") in table
    # The bootstrap interval (1000 draws of the 3 samples) holds the mean; the saturation guard's columns.
    assert float(grad["road_combined_low"]) <= float(grad["road_combined"]) <= float(grad["road_combined_high"])
    for row in rows:
        assert row["saturated"] in "01" and row["top10_changed"] in "01"
        assert row["deletion_auc_norm"] == "" if row["saturated"] == "1" else float(row["deletion_auc_norm"]) >= -1
        assert row["answer_change"] == "" or 0 < float(row["answer_change"]) <= 1
    for name in ("road_curves.png", "heat_table.png"):
        with Image.open(os.path.join(full_run, name)) as picture:
            assert picture.format == "PNG"


def test_killed_and_resumed_run_gives_the_same_csv(tmp_path, full_run, tiny_path, data_path, capsys):
    argv = ["--model", tiny_path, "--data", data_path, "--out", str(tmp_path / "out"), "--seed", "5"] + BASE_ARGS
    finished = []

    def kill_after_three(row):
        finished.append(row)
        if len(finished) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(options(argv), kill_after_three)
    with open(tmp_path / "out" / "per_sample.part0.csv", "a") as f:
        f.write("2,GradCAM,1,4")  # a row cut off mid-write
    resumed = []
    assert runner.run(options(argv), resumed.append) == 0
    assert len(resumed) == 3  # only the missing rows ran
    for name in ("per_sample.csv", "summary.csv", "benchmark.md"):
        assert (tmp_path / "out" / name).read_bytes() == Path(full_run, name).read_bytes()
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith("per_sample.part")]
    code, err = run_main(argv[:-len(BASE_ARGS)] + ["--seed", "6"] + BASE_ARGS, capsys)
    assert code == 2 and "holds a benchmark run with other settings (seed 5 there, 6 here)" in err


def test_a_map_that_fails_keeps_the_row_before_it(tmp_path, full_run, tiny_path, data_path, monkeypatch):
    """Rows run one ahead (the next map's imputation beside this row's model passes): when the next map fails, the
    row before it is still scored and written, and a resumed run completes the table as an uninterrupted one."""
    argv = ["--model", tiny_path, "--data", data_path, "--out", str(tmp_path / "out"), "--seed", "5"] + BASE_ARGS
    start_row = runner.Scorer.start_row

    def random_cam_fails(self, sample, inputs, method, layer):
        if method == "RandomCAM":
            raise RuntimeError("no map")
        return start_row(self, sample, inputs, method, layer)

    monkeypatch.setattr(runner.Scorer, "start_row", random_cam_fails)
    finished = []
    with pytest.raises(RuntimeError, match="no map"):
        runner.run(options(argv), finished.append)
    assert [(row["sample"], row["method"]) for row in finished] == [(0, "GradCAM")]
    monkeypatch.undo()
    resumed = []
    assert runner.run(options(argv), resumed.append) == 0
    assert len(resumed) == 5
    assert (tmp_path / "out" / "per_sample.csv").read_bytes() == Path(full_run, "per_sample.csv").read_bytes()


def test_two_processes_give_the_same_table(tmp_path, full_run, tiny_path, data_path):
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "pytorch_grad_cam_vlm", "benchmark", "--model", tiny_path, "--data", data_path, "--out", out,
               "--seed", "5"] + BASE_ARGS
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("per_sample.csv", "summary.csv", "benchmark.md"):
        assert Path(out, name).read_bytes() == Path(full_run, name).read_bytes(), name


# ------------------------------------------------------------------------------------------------ demo model
def test_demo_model_gradcam_at_the_auto_layer_beats_random_cam(tmp_path):
    from pytorch_grad_cam_vlm.demo import load_demo_model
    from pytorch_grad_cam_vlm.methods.sweep import auto_layer
    from pytorch_grad_cam_vlm.models.qwen_vl import QwenVLWrapper

    model, processor = load_demo_model()
    layer = auto_layer(QwenVLWrapper(model, processor, PROMPT))
    data = bench_data.write_demo_dataset(str(tmp_path / "data"), 12, seed=0)
    out = str(tmp_path / "out")
    assert cli.main(["benchmark", "--model", "demo", "--data", data, "--out", out, "--methods", "GradCAM",
                           "--layers", str(layer), "--percentiles", "20,50,80", "--no-sanity"]) == 0
    summary = {r["method"]: r for r in read_csv(os.path.join(out, "summary.csv"))}
    grad, random_cam = summary["GradCAM"], summary["RandomCAM"]
    assert float(grad["road_combined"]) > float(random_cam["road_combined"])
    assert float(grad["pointing"]) > float(random_cam["pointing"])


def test_cli_benchmark_subcommand_reports_bad_rows(tmp_path, tiny_path, capsys):
    """`pytorch-grad-cam-vlm benchmark` is the same runner: a bad row is named, exit code 2."""
    path = write_data(str(tmp_path / "data"), [dict(prompt=PROMPT, boxes=[[0, 0, 500, 28]])])
    code = cli.main(["benchmark", "--model", tiny_path, "--data", path, "--out", str(tmp_path / "out")] + BASE_ARGS)
    assert code == 2
    assert "data.jsonl line 1: boxes: box [0, 0, 500, 28] lies outside" in capsys.readouterr().err


def test_clip_model_benchmark_scores_its_texts(tmp_path, capsys):
    """CLIP models take --texts; a row's answer names the text to explain. The energy in the box equals that of the
    GradCAM map computed by hand for the answer's text."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pytorch_grad_cam_vlm import CLIPWrapper, build_tiny_clip

    model, processor = build_tiny_clip(tmp_path / "clip", family="clip")
    texts = ["a red circle", "a blue square"]
    rows = [dict(answer="a blue square", boxes=[[0, 0, 16, 16]]), dict(boxes=[[8, 8, 24, 24]])]
    path = write_data(str(tmp_path / "data"), rows, size=(32, 32))
    argv = ["--model", str(tmp_path / "clip"), "--data", path, "--out", str(tmp_path / "out"), "--texts", *texts,
            "--layers", "0", "--methods", "GradCAM", "--percentiles", "20,80"]
    code, _ = run_main(argv, capsys)
    assert code == 0
    results = {(r["sample"], r["method"]): r for r in read_csv(tmp_path / "out" / "per_sample.csv")}
    assert len(results) == 4 and results[("0", "GradCAM")]["target_token"] == "1"
    wrapper = CLIPWrapper(model, processor, texts=texts)
    x = wrapper.preprocess(os.path.join(tmp_path / "data", "im0.png"))
    with GradCAM(model=wrapper, target_layers=[wrapper.vision_layers[0]],
                 reshape_transform=wrapper.reshape_transform) as cam:
        expected = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])[0]
    assert float(results[("0", "GradCAM")]["energy"]) == pytest.approx(energy_in_box(expected, (0, 0, 16, 16)),
                                                                       abs=1e-5)
    bad = write_data(str(tmp_path / "bad"), [dict(answer="a green cat")], size=(32, 32))
    code, err = run_main(argv[:2] + ["--data", bad, "--out", str(tmp_path / "out2")] + argv[6:], capsys)
    assert code == 2 and "the answer 'a green cat' is not one of --texts" in err
