"""The explorer shows the smallest region that changes the answer of its chosen map: the page logic, without a server,
on the demo model against :func:`~pytorch_grad_cam_vlm.metrics.answer_change.answer_change` on the same map."""

import pytest
from PIL import Image

from pytorch_grad_cam_vlm.cli.explorer import Explorer, Request, explain_request
from pytorch_grad_cam_vlm.cli.explorer_views import answer_change_line, details, summary
from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples
from pytorch_grad_cam_vlm.image import load_rgb
from pytorch_grad_cam_vlm.metrics.answer_change import answer_change

pytestmark = pytest.mark.usefixtures("one_thread")


def test_explorer_reports_the_answer_change_of_its_map(tmp_path):
    sample = make_demo_samples(1, seed=3)[0]
    path = str(tmp_path / "sample.png")
    Image.fromarray(sample.image).save(path)
    explorer = Explorer(*load_demo_model(), "qwen2_5_vl", "demo", str(tmp_path / "work"))
    result = explain_request(explorer, Request(path, sample.prompt, method="GradCAM"))
    wrapper = explorer.subject(sample.prompt).wrapper
    expected = answer_change(wrapper, wrapper.preprocess(load_rgb(path)), result["map"]).share
    assert result["answer_change"] == expected
    assert details(result)["answer_change"] == expected
    assert answer_change_line(expected) in summary(result)
    # With an asked answer the model's output is that answer's one score: no top answer to change, nothing shown.
    asked = explain_request(explorer, Request(path, sample.prompt, answer=sample.answer, method="GradCAM"))
    assert "answer_change" not in asked and "Answer change" not in summary(asked)


def test_answer_change_line_reads_the_share_and_the_case_without_a_change():
    assert answer_change_line(0.15) == ("**Answer change** the top answer changes once the map's top **15%** of the "
                                        "pixels are removed")
    assert answer_change_line(None) == ("**Answer change** none: the top answer holds with every pixel removed in "
                                        "the map's order")
