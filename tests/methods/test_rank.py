"""rank_images / rank_captions: scores against the processor path by hand, maps against explain on each image alone,
the demo task's right answers first, every prompt-taking family, and bad input refused before the model runs."""
import numpy as np
import pytest
import torch
from conftest import PROMPT, model_state, random_image

from pytorch_grad_cam_vlm import (Gemma3Wrapper, Idefics3Wrapper, InternVLWrapper, LlavaWrapper, Mistral3Wrapper,
                                  Qwen3VLWrapper, QwenVLWrapper, build_tiny_gemma3, build_tiny_idefics3,
                                  build_tiny_internvl, build_tiny_llava, build_tiny_mistral3, build_tiny_qwen3_vl,
                                  load_demo_model, make_demo_samples)
from pytorch_grad_cam_vlm.methods.auto import explain
from pytorch_grad_cam_vlm.methods.rank import (DEFAULT_TEMPLATE, binary_entropy, rank_captions, rank_images,
                                               yes_no_prompt)
from pytorch_grad_cam_vlm.methods.targets import AnswerTarget, ContrastiveTarget
from pytorch_grad_cam_vlm.models.multi_image import MultiImage, prepare_several

QUESTION = "What shape is the red object?"
CHEAP = dict(method="GradCAM", layers="projector,1")  # two candidates: enough to exercise the choice per image


@pytest.fixture(scope="module")
def demo():
    model, processor = load_demo_model()
    return QwenVLWrapper(model, processor, prompt=PROMPT), make_demo_samples(8, seed=3)


def by_hand_logits(processor, model, image, prompt, answer=""):
    """The processor path: the chat text (plus the answer's text) and the raw image, the model's own logits."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True) + answer
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0].double(), inputs["input_ids"][0]


def test_answer_scoring_ranks_the_asked_shape_first_with_scores_and_maps_by_hand(demo):
    wrapper, samples = demo
    before = model_state(wrapper.model)
    ranking = rank_images(wrapper, [s.image for s in samples], question=QUESTION, answer="circle", **CHEAP)
    assert model_state(wrapper.model) == before and wrapper.prompt == PROMPT and wrapper.answer is None
    circles = {i for i, s in enumerate(samples) if s.answer == "circle"}
    assert 0 < len(circles) < len(samples)
    assert set(ranking.order[:len(circles)].tolist()) == circles and ranking.best in circles
    answer_id = wrapper.token_id("circle")
    for i, sample in enumerate(samples):
        logits, ids = by_hand_logits(wrapper.processor, wrapper.model, sample.image, QUESTION, "circle")
        assert ids[-1] == answer_id
        p = float(torch.softmax(logits[-2], -1)[answer_id])  # the answer's one token, predicted one position before
        np.testing.assert_allclose(ranking.scores[i], p, atol=1e-6)
        q = ranking.scores[i]  # the entropy's slope near p = 1 magnifies the score's float rounding: take its own
        np.testing.assert_allclose(ranking.entropies[i], -q * np.log2(q) - (1 - q) * np.log2(1 - q), rtol=1e-12)
    asked = QwenVLWrapper(wrapper.model, wrapper.processor, prompt=QUESTION, answer="circle")
    for i, sample in enumerate(samples):
        alone = explain(asked, asked.preprocess(sample.image), [AnswerTarget()], **CHEAP)
        np.testing.assert_allclose(ranking.maps[i], alone.maps[0], atol=1e-5)
        assert (ranking.methods[i], ranking.layers[i]) == (alone.methods[0], alone.layers[0])
        assert ranking.checks[i].score == pytest.approx(alone.checks[0].score, abs=1e-5)
    rows = ranking.rows()
    assert [r["rank"] for r in rows] == list(range(1, len(samples) + 1))
    assert [r["index"] for r in rows] == ranking.order.tolist() and rows[0]["score"] >= rows[-1]["score"]


def test_yes_no_scores_equal_a_softmax_over_the_two_tokens_by_hand(demo):
    wrapper, samples = demo
    caption = "a red circle"
    ranking = rank_images(wrapper, [s.image for s in samples[:3]], caption=caption, yes_no=("yes", "no"), **CHEAP)
    yes, no = wrapper.token_id("yes"), wrapper.token_id("no")
    for i, sample in enumerate(samples[:3]):
        logits, _ = by_hand_logits(wrapper.processor, wrapper.model, sample.image,
                                   DEFAULT_TEMPLATE.format(caption=caption))
        expected = float(torch.softmax(logits[-1, [yes, no]], -1)[0])
        np.testing.assert_allclose(ranking.scores[i], expected, atol=1e-6)
    assert ranking.queries[0].prompt == "Does this image show: a red circle? Answer yes or no."
    with_prompt = QwenVLWrapper(wrapper.model, wrapper.processor, prompt=ranking.queries[0].prompt)
    x = with_prompt.preprocess(samples[1].image)
    alone = explain(with_prompt, x, [ContrastiveTarget(yes, no)], **CHEAP)
    np.testing.assert_allclose(ranking.maps[1], alone.maps[0], atol=1e-5)


def test_the_reverse_ranks_the_right_answer_first_for_one_image(demo):
    wrapper, samples = demo
    for sample in samples[:3]:
        ranking = rank_captions(wrapper, sample.image, question=QUESTION, answers=["circle", "square", "triangle"],
                                **CHEAP)
        assert ranking.names[ranking.best] == sample.answer
        assert [q.answer for q in ranking.queries] == ["circle", "square", "triangle"]
        single = rank_images(wrapper, [sample.image], question=QUESTION, answer=ranking.names[1], **CHEAP)
        np.testing.assert_allclose(ranking.scores[1], single.scores[0], atol=1e-9)


def test_figure_has_one_panel_per_item_in_rank_order(demo, tmp_path):
    from PIL import Image

    from pytorch_grad_cam_vlm.visualize import figure_size

    wrapper, samples = demo
    ranking = rank_images(wrapper, [s.image for s in samples[:5]], question=QUESTION, answer="square", **CHEAP)
    path = ranking.plot(str(tmp_path / "ranking.png"))
    with Image.open(path) as figure:
        assert figure.size == figure_size(2, 4, 112, 112)


def test_binary_entropy():
    np.testing.assert_allclose(binary_entropy([0.0, 0.5, 1.0, 0.25]), [0.0, 1.0, 0.0, 0.8112781244591328])


def test_bad_input_one_clear_error_each_before_the_model_runs(demo):
    wrapper, samples = demo
    image = samples[0].image
    with pytest.raises(ValueError, match="Nothing to rank: pass at least one image"):
        rank_images(wrapper, [], question=QUESTION, answer="circle")
    with pytest.raises(ValueError, match="Nothing to rank: pass at least one caption"):
        rank_captions(wrapper, image, captions=[])
    with pytest.raises(ValueError, match=r"one \{caption\} placeholder"):
        rank_images(wrapper, [image], caption="a red circle", template="Is it there? Answer yes or no.")
    with pytest.raises(ValueError, match=r"one \{caption\} placeholder"):
        yes_no_prompt("x", "{caption} and {other}")
    with pytest.raises(ValueError, match="yes_no=\\('Yes', 'No'\\).*does not know 'Yes'"):
        rank_images(wrapper, [image], caption="a red circle")  # the word-level demo vocabulary is lower-case
    with pytest.raises(ValueError, match="give one of them"):
        rank_images(wrapper, [image])
    with pytest.raises(ValueError, match="needs the answer to score"):
        rank_images(wrapper, [image], question=QUESTION)
    # an image the family cannot take (Qwen's smart_resize refuses an aspect ratio over 200): named, nothing run
    thin = np.zeros((4, 1000, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="^thin: "):
        rank_images(wrapper, [image, thin], question=QUESTION, answer="circle", names=["ok", "thin"])
    with pytest.raises(ValueError, match="Pass the question alone"):
        rank_images(wrapper, [image], question="<|image_pad|> what?", answer="circle")
    assert wrapper.prompt == PROMPT and wrapper.answer is None


def test_a_wrapper_without_a_prompt_is_refused(tmp_path):
    from pytorch_grad_cam_vlm import CLIPWrapper, build_tiny_clip

    model, processor = build_tiny_clip(tmp_path / "clip")
    wrapper = CLIPWrapper(model, processor, texts=["a", "b"])
    with pytest.raises(ValueError, match="CLIPWrapper takes none: use a prompt-taking wrapper"):
        rank_images(wrapper, [random_image(32, 32)], question=QUESTION, answer="circle")


FAMILIES = {
    "qwen3_vl": (lambda p: build_tiny_qwen3_vl(p, seed=0), Qwen3VLWrapper),
    "llava": (lambda p: build_tiny_llava(p, family="llava", seed=0), LlavaWrapper),
    "gemma3": (lambda p: build_tiny_gemma3(p, seed=1), Gemma3Wrapper),
    "internvl": (lambda p: build_tiny_internvl(p, seed=0), InternVLWrapper),
    "idefics3": (lambda p: build_tiny_idefics3(p, family="idefics3", seed=0), Idefics3Wrapper),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_prompt_taking_family_ranks_as_a_wrapper_asked_directly(family, tmp_path):
    build, wrapper_cls = FAMILIES[family]
    model, processor = build(tmp_path / family)
    wrapper = wrapper_cls(model, processor, prompt=PROMPT)
    images = [random_image(64, 64, seed=s) for s in range(3)]
    before = model_state(model)
    ranking = rank_images(wrapper, images, caption="a red circle", yes_no=("yes", "no"), method="GradCAM",
                          layers="1")
    assert model_state(model) == before and wrapper.prompt == PROMPT
    direct = wrapper_cls(model, processor, prompt=yes_no_prompt("a red circle"))
    yes, no = direct.token_id("yes"), direct.token_id("no")
    for i, image in enumerate(images):
        x = direct.preprocess(image)
        with torch.no_grad():
            logits = direct(x)[0].double()
        np.testing.assert_allclose(ranking.scores[i], float(torch.softmax(logits[[yes, no]], -1)[0]), atol=1e-6)
        alone = explain(direct, image, [ContrastiveTarget(yes, no)], method="GradCAM", layers="1")
        np.testing.assert_allclose(ranking.maps[i], alone.maps[0], atol=1e-5)  # both on the image as passed
        assert ranking.rgb[i].shape[:2] == ranking.maps[i].shape == image.shape[:2]
    answers = rank_captions(wrapper, images[0], question=PROMPT, answers=["red", "blue"], method="GradCAM",
                            layers="1")
    blue = wrapper_cls(model, processor, prompt=PROMPT, answer="blue")
    with torch.no_grad():
        np.testing.assert_allclose(answers.scores[1], float(blue(blue.preprocess(images[0]))[0, 0].exp()), atol=1e-6)



def test_a_query_image_beside_each_image_scores_as_the_processor_with_both(demo):
    wrapper, samples = demo
    query, images = samples[0].image, [s.image for s in samples[1:4]]
    ranking = rank_images(wrapper, images, question=QUESTION, answer="circle", query_image=query, **CHEAP)
    assert wrapper.image_boxes is None and wrapper.prompt == PROMPT
    answer_id = wrapper.token_id("circle")
    for i, image in enumerate(images):
        content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
        text = wrapper.processor.apply_chat_template([{"role": "user", "content": content}],
                                                     add_generation_prompt=True) + "circle"
        inputs = wrapper.processor(text=[text], images=[query, image], return_tensors="pt")
        with torch.no_grad():
            logits = wrapper.model(**inputs).logits[0, -2].double()
        np.testing.assert_allclose(ranking.scores[i], float(torch.softmax(logits, -1)[answer_id]), atol=1e-6)
    asked = QwenVLWrapper(wrapper.model, wrapper.processor, prompt=QUESTION, answer="circle")
    x = asked.preprocess([query, images[1]])
    alone = explain(asked, x, [AnswerTarget()], **CHEAP)
    top, left, height, width = asked.image_boxes.boxes[1]
    np.testing.assert_allclose(ranking.maps[1], alone.maps[0][top:top + height, left:left + width], atol=1e-5)
    assert ranking.rgb[1].shape[:2] == (height, width) == samples[2].image.shape[:2]
    np.testing.assert_allclose(ranking.rgb[1], samples[2].image / 255, atol=1e-6)  # the image as passed


def test_a_query_image_beside_each_image_on_a_tiled_family_scores_and_maps_as_its_canvas(tmp_path):
    model, processor = build_tiny_llava(tmp_path / "llava", seed=0)
    wrapper = LlavaWrapper(model, processor, prompt=PROMPT)
    query, images = random_image(40, 56, seed=1), [random_image(48, 32, seed=2), random_image(36, 36, seed=3)]
    ranking = rank_images(wrapper, images, question=QUESTION, answer="red", query_image=query, **CHEAP)
    assert wrapper.image_boxes is None and wrapper.prompt == PROMPT
    asked = LlavaWrapper(model, processor, prompt=QUESTION, answer="red")
    for i, image in enumerate(images):
        x = asked.preprocess([query, image])  # the canvas of both (its logits: test_multi_image's processor path)
        with torch.no_grad():
            np.testing.assert_allclose(ranking.scores[i], float(asked(x)[0, 0].exp()), atol=1e-6)
        alone = explain(asked, x, [AnswerTarget()], **CHEAP)
        top, left, height, width = asked.image_boxes.boxes[1]
        # the image's box of the canvas map, carried onto the image as passed (the box is its tiles' letterbox)
        _, frames = prepare_several(asked, MultiImage([query, image]))
        expected = frames[1].to_image(alone.maps[0][top:top + height, left:left + width])
        np.testing.assert_allclose(ranking.maps[i], expected, atol=1e-5)
        assert ranking.maps[i].shape == ranking.rgb[i].shape[:2] == image.shape[:2] != (height, width)


def test_a_query_image_needs_a_family_that_takes_several(tmp_path):
    model, processor = build_tiny_mistral3(tmp_path / "mistral3", seed=0)
    wrapper = Mistral3Wrapper(model, processor, prompt=PROMPT)
    with pytest.raises(ValueError, match="Mistral3Wrapper takes one image per prompt; several images in one prompt "
                                         "work with Qwen2-VL"):
        rank_images(wrapper, [random_image(32, 32)], question=QUESTION, answer="red", query_image=random_image(32, 32))