"""The benchmark's report (benchmark/report.py): benchmark.md opens with the best method x layer per metric and a
reading of the numbers; --compare prints B - A per method x layer and metric; bad run folders give one error line
and exit code 2."""
import csv
import os

from pytorch_grad_cam_vlm import cli
from pytorch_grad_cam_vlm.benchmark.report import METRICS, markdown_tables


def summary_row(method, layer, **scores):
    return dict(method=method, layer=layer, n=4, **{metric: scores.get(metric) for metric in METRICS})


def test_markdown_opens_with_the_best_pair_per_metric_and_a_reading():
    summary = [summary_row("GradCAM", 1, road_combined=0.5, deletion_auc=0.2, insertion_auc=0.7, pointing=0.75,
                           sanity=0.1),
               summary_row("GradCAM", 2, road_combined=0.9, deletion_auc=0.25, insertion_auc=0.8, pointing=0.5,
                           sanity=0.6),
               summary_row("LayerCAM", 1, road_combined=-0.2, deletion_auc=0.6, insertion_auc=0.4, pointing=0.0,
                           sanity=0.3),
               summary_row("RandomCAM", 1, road_combined=0.0, deletion_auc=0.5, insertion_auc=0.5, pointing=0.25),
               summary_row("RandomCAM", 2, road_combined=0.1, deletion_auc=0.5, insertion_auc=0.45, pointing=0.0)]
    summary[1].update(road_combined_low=0.7, road_combined_high=1.1, saturated=0.25)
    summary[0].update(road_combined_low=0.3, road_combined_high=0.6, saturated=0.25, deletion_auc_low=0.1,
                      deletion_auc_high=0.3)
    summary[1].update(deletion_auc_low=0.2, deletion_auc_high=0.3)
    lines = markdown_tables(summary, "Header.").splitlines()
    assert lines[0] == "Header." and lines[2].startswith("Best method x layer per metric")
    assert lines[4:10] == [
        "| metric | better | method | layer | value | RandomCAM | next best |", "|---|---|---|---|---|---|---|",
        "| ROAD combined (logits) | higher | GradCAM | 2 | 0.900 [0.700, 1.100] | 0.100 | GradCAM 1: 0.500 (separable) |",
        "| deletion AUC (score x share) | lower | GradCAM | 1 | 0.200 [0.100, 0.300] | 0.500 | GradCAM 2: 0.250 "
        "(not separable) |",
        "| insertion AUC (score x share) | higher | GradCAM | 2 | 0.800 | 0.450 | GradCAM 1: 0.700 |",
        "| pointing (share of maps) | higher | GradCAM | 1 | 0.750 | 0.250 | GradCAM 2: 0.500 |"]
    assert lines[14].startswith("Saturation guard: 2 of 8 rows flagged (a canvas kept half")
    reading = lines[12]
    assert reading.startswith("GradCAM at layer 1 is best on 3 of 5 metrics (deletion AUC, pointing, sanity). "
                              "2 of 3 method x layer pairs beat RandomCAM at their layer on ROAD combined. "
                              "2 of 3 method x layer pairs beat RandomCAM at their layer on insertion - deletion AUC. "
                              "ROAD combined and insertion - deletion AUC agree on the ranking of the pairs "
                              "(Spearman +1.00).")
    assert "correlates +0.60 with the randomized model's (above 0.5" in reading
    assert any(line.startswith("| GradCAM | 2 | 0.900 [0.700, 1.100] | +0.800 |") for line in lines)  # vs RandomCAM at layer 2


def write_summary(folder, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "layer", "n", "road_combined", "pointing", "sanity"])
        writer.writeheader()
        writer.writerows(rows)
    return str(folder)


def test_compare_prints_the_difference_of_two_runs(tmp_path, capsys):
    a = write_summary(tmp_path / "a", [dict(method="GradCAM", layer=1, n=4, road_combined=0.5, pointing=0.75,
                                            sanity=""),
                                       dict(method="RandomCAM", layer=1, n=4, road_combined=0.0, pointing=0.25)])
    b = write_summary(tmp_path / "b", [dict(method="GradCAM", layer=1, n=4, road_combined=0.7, pointing=0.5,
                                            sanity=0.2),
                                       dict(method="GradCAM", layer=2, n=4, road_combined=0.1, pointing=0.5)])
    assert cli.main(["benchmark", "--compare", a, b]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2:5] == ["| method | layer | ROAD combined | pointing |", "|---|---|---|---|",
                        "| GradCAM | 1 | +0.200 | -0.250 |"]
    assert out[-3:] == ["", "Only in A: RandomCAM layer 1.", "Only in B: GradCAM layer 2."]


def test_bad_run_folders_give_one_error_line_and_exit_code_2(tmp_path, capsys):
    good = write_summary(tmp_path / "good", [dict(method="GradCAM", layer=1, n=4, road_combined=0.5)])
    assert cli.main(["benchmark", "--compare", str(tmp_path / "missing"), good]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: not a benchmark run folder (no summary.csv there)." in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.csv").write_text("method,layer\nGradCAM,first\n")
    assert cli.main(["benchmark", "--compare", good, str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "summary.csv: not a benchmark summary (ValueError" in err
    assert cli.main(["benchmark", "--model", "demo"]) == 2
    assert ("the following arguments are required: --data, --out (or --compare RUN_A RUN_B, or --eagle-table RUN "
            "...).") in capsys.readouterr().err
