"""Word, answer, per-token and contrastive targets, checked against computations by hand on the raw model."""
import functools
import math

import numpy as np
import pytest
import torch
from conftest import PROMPT, model_state, random_image
from pytorch_grad_cam import GradCAM, HiResCAM
from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
from pytorch_grad_cam.utils.image import scale_cam_image

from pytorch_grad_cam_vlm import QwenVLWrapper
from pytorch_grad_cam_vlm.methods.answers import explain_generated, plot_per_token
from pytorch_grad_cam_vlm.methods.smooth_grad import SmoothGradCAM
from pytorch_grad_cam_vlm.methods.targets import AnswerTarget, ContrastiveTarget, WordTarget
from pytorch_grad_cam_vlm.models.frame import ImageFrame
from pytorch_grad_cam_vlm.visualize import figure_size
from pytorch_grad_cam_vlm.models.tiny.qwen_vl import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS

ANSWER = "a red circle"
SIZE = 112


@pytest.fixture(scope="module")
def image():
    return random_image(SIZE, SIZE, seed=3)


def processor_inputs(processor, image, answer_text="", answer_ids=(), device="cpu"):
    """The processor on the chat text (plus an answer as text), with answer token ids appended by hand; tensors on
    ``device``."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True) + answer_text
    inputs = dict(processor(text=[text], images=[image], return_tensors="pt"))
    if len(answer_ids):
        ids = torch.tensor([list(answer_ids)])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(ids)], 1)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    return {k: v.to(device) for k, v in inputs.items()}


def cam_by_hand(model, processor, inputs, layer, score_fn, method="gradcam"):
    """Grad-CAM (mean gradient per channel) or HiResCAM (gradient x activation) of ``score_fn(logits)`` at a decoder
    layer's image positions, from one plain model call with a hook, scaled as grad-cam scales its maps."""
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.setdefault("hidden", o[0] if isinstance(o, tuple)
                                                                            else o))
    try:
        with torch.enable_grad():
            logits = model(**inputs, use_cache=False).logits.float()
            score = score_fn(logits)
            grad = torch.autograd.grad(score, captured["hidden"])[0]
    finally:
        handle.remove()
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    positions = (inputs["input_ids"][0] == image_id).nonzero().flatten()
    _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
    acts = captured["hidden"][0, positions].detach().reshape(gh // 2, gw // 2, -1)
    grads = grad[0, positions].reshape(gh // 2, gw // 2, -1)
    cam = (acts * grads.mean((0, 1))).sum(-1) if method == "gradcam" else (acts * grads).sum(-1)
    cam = np.maximum(cam.cpu().numpy(), 0)[None]
    return scale_cam_image(scale_cam_image(cam, (gh * 14, gw * 14)))[0]


def run_cam(method, wrapper, x, targets, layer):
    with method(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform) as cam:
        return cam(input_tensor=x, targets=targets)


# ------------------------------------------------------------------------------------------------- words
def test_word_target_scores_the_word_logit(wrapper, image):
    x = wrapper.preprocess(image)
    red = wrapper.token_id("red")
    assert red == wrapper.processor.tokenizer.convert_tokens_to_ids("red")
    assert wrapper.token_id(" red") == red  # a word-level tokenizer drops the space
    logits = wrapper(x)
    assert WordTarget(wrapper, "red")(logits[0]).item() == logits[0, red].item()
    with pytest.raises(ValueError, match="does not know 'purple'"):
        wrapper.token_id("purple")


def byte_level_processor(path):
    """A Qwen-like byte-level BPE tokenizer in a real processor, saved and loaded back: "red" and " red" are two
    tokens, and "circle" splits into "cir" + "cle"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (AutoProcessor, PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    merges = [("r", "e"), ("re", "d"), ("Ġ", "red"), ("c", "i"), ("ci", "r"), ("c", "l"), ("cl", "e")]
    vocab = {}
    for token in pre_tokenizers.ByteLevel.alphabet() + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        additional_special_tokens=list(QWEN_SPECIAL_TOKENS))
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return AutoProcessor.from_pretrained(path)


def test_leading_space_and_multi_token_words(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    processor = byte_level_processor(tmp_path)
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    tokens = processor.tokenizer.convert_tokens_to_ids
    assert wrapper.token_id("red") == tokens("red")
    assert wrapper.token_id(" red") == tokens("Ġred") != tokens("red")
    with pytest.raises(ValueError, match=r"splits 'circle' into 2 tokens \['cir', 'cle'\].*set_answer\('circle'\)"):
        wrapper.token_id("circle")
    with pytest.raises(ValueError, match="splits 'circle'"):
        WordTarget(wrapper, "circle")


# ------------------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_answer_score_is_the_answer_log_probs(tiny_qwen, image, reduction):
    model, processor = tiny_qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT, answer=ANSWER, answer_reduction=reduction)
    x = wrapper.preprocess(image)
    inputs = processor_inputs(processor, image, ANSWER)
    answer_ids = processor.tokenizer.encode(ANSWER, add_special_tokens=False)
    assert inputs["input_ids"][0, -len(answer_ids):].tolist() == answer_ids == wrapper.layout_for(SIZE, SIZE).answer_ids.tolist()
    with torch.no_grad():
        logits = model(**inputs).logits[0, -len(answer_ids) - 1:-1].float()
        log_probs = torch.log_softmax(logits, -1)[torch.arange(len(answer_ids)), answer_ids]
        score = wrapper(x)
        answer_logits = wrapper.answer_logits(x)
    expected = log_probs.sum() if reduction == "sum" else log_probs.mean()
    assert score.shape == (1, 1)
    assert score[0, 0].item() == pytest.approx(expected.item(), abs=1e-4)
    torch.testing.assert_close(answer_logits[0], logits, atol=1e-4, rtol=0)


def test_answer_as_token_ids_matches_answer_as_text(tiny_qwen, image):
    model, processor = tiny_qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT, answer=ANSWER)
    x = wrapper.preprocess(image)
    with torch.no_grad():
        from_text = wrapper(x)
        wrapper.set_answer(processor.tokenizer.encode(ANSWER, add_special_tokens=False))
        from_ids = wrapper(x)
        wrapper.set_answer(None)
        next_token = wrapper(x)
    assert from_ids.item() == pytest.approx(from_text.item(), abs=1e-5)
    assert next_token.shape == (1, len(processor.tokenizer))


@pytest.mark.parametrize("method, name", [(GradCAM, "gradcam"), (HiResCAM, "hirescam")])
def test_answer_map_equals_map_of_answer_log_probs_by_hand(qwen, device, image, method, name):
    model, processor = qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT, answer=ANSWER)
    x = wrapper.preprocess(image)
    layer = wrapper.decoder_layers[1]
    n = len(processor.tokenizer.encode(ANSWER, add_special_tokens=False))
    ids = processor_inputs(processor, image, ANSWER)["input_ids"][0, -n:]

    def answer_log_prob(logits):
        return torch.log_softmax(logits[0, -n - 1:-1], -1)[torch.arange(n), ids].sum()

    expected = cam_by_hand(model, processor, processor_inputs(processor, image, ANSWER, device=device), layer,
                           answer_log_prob, name)
    default = run_cam(method, wrapper, x, None, layer)[0]
    np.testing.assert_allclose(default, expected, atol=1e-5)
    np.testing.assert_allclose(run_cam(method, wrapper, x, [AnswerTarget()], layer)[0], default, atol=1e-6)


def test_road_scores_the_answer(tiny_qwen, image):
    model, processor = tiny_qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT, answer=ANSWER)
    x = wrapper.preprocess(image)
    cams = run_cam(GradCAM, wrapper, x, None, wrapper.decoder_layers[1])
    scores, perturbed = ROADMostRelevantFirst(percentile=50)(x, cams, [AnswerTarget()], wrapper,
                                                             return_visualization=True)
    with torch.no_grad():
        expected = wrapper(perturbed)[0, 0] - wrapper(x)[0, 0]
    assert scores[0] == pytest.approx(expected.item(), abs=1e-4)
    assert abs(scores[0]) > 1e-3  # removing half the image changes the answer's log-probability


def test_targets_refuse_the_other_mode(tiny_qwen, image):
    model, processor = tiny_qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT)
    x = wrapper.preprocess(image)
    with pytest.raises(ValueError, match="needs a wrapper with an answer"):
        run_cam(GradCAM, wrapper, x, [AnswerTarget()], wrapper.decoder_layers[1])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        run_cam(GradCAM, wrapper, x, [ContrastiveTarget(1, 10 ** 6)], wrapper.decoder_layers[1])
    with pytest.raises(ValueError, match="No answer is set"):
        wrapper.answer_logits(x)
    wrapper.set_answer(ANSWER)
    with pytest.raises(ValueError, match="returns an answer score"):
        run_cam(GradCAM, wrapper, x, [WordTarget(wrapper, "red")], wrapper.decoder_layers[1])
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        wrapper.set_answer(ANSWER, reduction="max")
    with pytest.raises(ValueError, match="without images"):
        wrapper.set_answer("a <|image_pad|>")
    with pytest.raises(ValueError, match="does not know part of the answer"):
        wrapper.set_answer("a purple circle")
        wrapper(x)


# ------------------------------------------------------------------------------------------------- contrast
def test_contrastive_map_equals_gradcam_of_logit_difference(wrapper, tiny_qwen, image):
    model, processor = tiny_qwen
    x = wrapper.preprocess(image)
    red, blue = wrapper.token_id("red"), wrapper.token_id("blue")
    layer = wrapper.decoder_layers[1]
    expected = cam_by_hand(model, processor, processor_inputs(processor, image), layer,
                           lambda logits: logits[0, -1, red] - logits[0, -1, blue])
    actual = run_cam(GradCAM, wrapper, x, [ContrastiveTarget(red, blue)], layer)[0]
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    only_red = run_cam(GradCAM, wrapper, x, [WordTarget(wrapper, "red")], layer)[0]
    assert np.abs(actual - only_red).max() > 0.05  # the contrast is not the word alone


# ------------------------------------------------------------------------------------------------- generated
def test_per_token_maps_equal_single_token_maps_with_prefix(qwen_wrapper, qwen, device, image):
    wrapper = qwen_wrapper
    model, processor = qwen
    x = wrapper.preprocess(image)
    layer = wrapper.decoder_layers[1]
    before = model_state(model)
    batched = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: batched.append(kwargs["input_ids"].shape[0]) if kwargs["input_ids"].shape[0] > 1
        else None, with_kwargs=True)
    try:
        result = explain_generated(wrapper, x, [layer], max_new_tokens=3, batch_size=8,
                                   generate_kwargs=dict(min_new_tokens=3))
    finally:
        hook.remove()
    assert model_state(model) == before and wrapper.answer is None
    assert batched == [4]  # 3 tokens and the combined map in one pass
    tokens = result.token_ids
    assert len(tokens) == 3 and result.maps.shape == (3, SIZE, SIZE) and result.combined.shape == (SIZE, SIZE)
    assert result.tokens == [processor.tokenizer.decode([t]) for t in tokens]
    for t, token in enumerate(tokens):
        inputs = processor_inputs(processor, image, answer_ids=tokens[:t], device=device)
        expected = cam_by_hand(model, processor, inputs, layer, lambda logits: logits[0, -1, token])
        np.testing.assert_allclose(result.maps[t], expected, atol=1e-5)
        with torch.no_grad():
            probability = torch.softmax(model(**inputs).logits[0, -1].float(), -1)[token]
        assert result.probabilities[t] == pytest.approx(probability.item(), abs=1e-5)
    n = len(tokens)
    inputs = processor_inputs(processor, image, answer_ids=tokens, device=device)
    combined = cam_by_hand(model, processor, inputs, layer,
                           lambda logits: logits[0, -n - 1:-1][torch.arange(n), tokens].sum())
    np.testing.assert_allclose(result.combined, combined, atol=1e-5)


def test_per_token_log_probs_in_chunks_combine_to_the_answer_map(wrapper, tiny_qwen, image):
    model, processor = tiny_qwen
    x = wrapper.preprocess(image)
    layer = wrapper.decoder_layers[1]
    tokens = processor.tokenizer.encode(ANSWER, add_special_tokens=False)
    result = explain_generated(wrapper, x, [layer], answer=ANSWER, score="log_prob", batch_size=2)
    assert result.token_ids == tokens
    answer_wrapper = QwenVLWrapper(model, processor, prompt=PROMPT, answer=ANSWER)
    np.testing.assert_allclose(result.combined, run_cam(GradCAM, answer_wrapper, x, None, layer)[0], atol=1e-5)
    assert result.text == ANSWER
    with torch.no_grad():
        expected = answer_wrapper.answer_token_scores(x).exp()[0].numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)

    figure = plot_per_token(result, wrapper.to_rgb(x)[0])
    panels = len(tokens) + 1
    assert len(figure.axes) == panels + 1  # and the colour bar
    assert [text.get_text() for text in figure.texts][1:] == ["all 3 tokens"] + [
        f"{t} · p={p:.2f}" for t, p in zip(ANSWER.split(), result.probabilities)]
    width, height = figure.get_size_inches() * figure.dpi
    assert (round(width), round(height)) == figure_size(math.ceil(panels / 4), 4, SIZE, SIZE)  # test_visualize's
    with pytest.raises(ValueError, match="pass the image that was explained"):
        plot_per_token(result, np.zeros((28, 28, 3)))


def test_per_token_maps_lie_on_the_users_image(wrapper):
    """Given the picture, or its input with ``image_size``, the token maps lie on the picture: the input's maps
    carried by the Qwen layout's plain resize (docs/frames.md), as ``explain`` gives them."""
    picture = random_image(90, 150, seed=4)
    x = wrapper.preprocess(picture)
    layer = wrapper.decoder_layers[1]
    on_input = explain_generated(wrapper, x, [layer], answer=ANSWER)  # no image_size: the input is the image
    assert tuple(x.shape[2:]) != (90, 150) and on_input.frame.identity and on_input.maps.shape[1:] == x.shape[2:]
    frame = ImageFrame.resized((90, 150), tuple(x.shape[2:]))
    for result in (explain_generated(wrapper, picture, [layer], answer=ANSWER),
                   explain_generated(wrapper, x, [layer], answer=ANSWER, image_size=(90, 150))):
        assert result.maps.shape == (3, 90, 150) and result.combined.shape == (90, 150) and result.frame == frame
        np.testing.assert_allclose(result.model_maps, on_input.maps, atol=1e-6)
        np.testing.assert_allclose(result.model_combined, on_input.combined, atol=1e-6)
        np.testing.assert_allclose(result.maps, frame.to_image(on_input.maps), atol=1e-6)
        np.testing.assert_allclose(result.combined, frame.to_image(on_input.combined), atol=1e-6)
    assert len(plot_per_token(result, picture / 255.0).axes) == 4 + 1  # on the picture itself; the colour bar
    with pytest.raises(ValueError, match="image_size goes with preprocessed inputs"):
        explain_generated(wrapper, picture, [layer], answer=ANSWER, image_size=(90, 150))
    with pytest.raises(ValueError, match="one image's answer at a time"):
        explain_generated(wrapper, torch.cat([x, x]), [layer], answer=ANSWER)


def test_smooth_grad_twin_explains_answers(tiny_qwen, image):
    model, processor = tiny_qwen
    wrapper = QwenVLWrapper(model, processor, prompt=PROMPT, answer=ANSWER)
    x = wrapper.preprocess(image)
    layer = wrapper.decoder_layers[1]
    gradcam = run_cam(GradCAM, wrapper, x, None, layer)
    smooth = functools.partial(SmoothGradCAM, noise_level=0.0)
    np.testing.assert_allclose(run_cam(smooth, wrapper, x, [AnswerTarget()], layer), gradcam, atol=1e-6)
    noisy = functools.partial(SmoothGradCAM, n_samples=2, noise_level=0.2, seed=0)
    assert np.abs(run_cam(noisy, wrapper, x, None, layer) - gradcam).max() > 1e-3
    tokens = processor.tokenizer.encode(ANSWER, add_special_tokens=False)
    wrapper.set_answer(None)
    per_token = explain_generated(wrapper, x, [layer], method=smooth, answer=tokens, score="log_prob")
    np.testing.assert_allclose(per_token.combined, gradcam[0], atol=1e-5)
