"""The explorer's page: a thin Gradio shell (``gradio.Blocks``) around the plain functions of
:mod:`pytorch_grad_cam_vlm.cli.explorer`. Gradio is imported here only, and this module only by ``app``."""
from __future__ import annotations

from typing import List, Optional

import gradio as gr

from pytorch_grad_cam_vlm.cli.explorer import Explorer, Request, explain_request
from pytorch_grad_cam_vlm.cli.explorer_views import details, heatmap_figure, strip_items, summary, token_map
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.layers import layer_name
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS
from pytorch_grad_cam_vlm.methods.catalog import method_classes
from pytorch_grad_cam_vlm.visualize import overlay

WHOLE_ANSWER = -1  # the token chip of the whole answer
# Small maps (a 112-pixel demo image) drawn at the panel's size, their pixels kept sharp.
PAGE_CSS = "#overlay img, #image img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}"
INTRO = ("Upload an image (or click an example), ask a question and press **Explain**. The map shows where the model "
         "looked to say its next token; `auto` picks the method and layer whose map ranks best on the deletion check "
         "(removing the map's most relevant pixels should hurt the answer more than removing its least relevant, "
         "and removing the window around its peak should hurt it). "
         "Click a layer in the strip to explain at that layer.")


def page_error(error: Exception) -> gr.Error:
    """One message in the page (a Gradio error toast) for bad input; the server carries on."""
    return gr.Error(str(error).splitlines()[0] if str(error) else type(error).__name__, title="Cannot explain",
                    print_exception=False)


def upload_path(value) -> Optional[str]:
    """The server-side path of an image input's raw value: a Gradio ``FileData`` dict, whose file Gradio has checked
    to be an upload (or an example) in its cache. Anything else counts as no image: a bare path could name any file
    of the server."""
    return value.get("path") if isinstance(value, dict) else None


def upload_name(value) -> str:
    return (value.get("orig_name") if isinstance(value, dict) else None) or "image"


def build_page(explorer: Explorer, examples: List[List[str]]) -> gr.Blocks:
    """The page of ``explorer``'s model with ``examples`` (``[image path, prompt]`` rows), queued one request at a
    time."""
    decoder = explorer.targets[0]
    n_layers = explorer.layer_count(decoder)
    with gr.Blocks(title=f"pytorch-grad-cam-vlm explorer · {explorer.name}", analytics_enabled=False,
                   delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## pytorch-grad-cam-vlm explorer · `{explorer.name}` ({explorer.family})\n\n{INTRO}")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=240,
                                 elem_id="image")
                prompt = gr.Textbox(label="Prompt" if explorer.takes_prompt else "Captions, one per line",
                                    lines=1 if explorer.takes_prompt else 3, elem_id="prompt")
                answer = gr.Textbox(label="Answer to explain (optional; empty: the predicted next token)",
                                    visible=explorer.takes_prompt, elem_id="answer")
                per_token = gr.Checkbox(label="Explain the generated answer, token by token", value=False,
                                        visible=explorer.takes_prompt, elem_id="per-token")
                with gr.Row():
                    method = gr.Dropdown(["auto"] + list(method_classes()), value="auto", label="Method",
                                         info=f"auto: the best-ranked by the check of {', '.join(AUTO_METHODS)}",
                                         elem_id="method")
                    target = gr.Radio(list(explorer.targets), value=decoder, label="Layers of", elem_id="target")
                with gr.Row():
                    auto_layer = gr.Checkbox(label="auto layer", value=True, scale=1, elem_id="auto-layer")
                    layer = gr.Slider(0, n_layers - 1, value=0, step=1, label="Layer", scale=3, elem_id="layer")
                with gr.Accordion("Smooth options (Smooth methods only)", open=False):
                    n_samples = gr.Slider(1, 200, value=50, step=1, label="n_samples (noisy copies)")
                    noise_level = gr.Slider(0, 1, value=0.15, step=0.01, label="noise level (fraction of the range)")
                run = gr.Button("Explain", variant="primary", elem_id="explain-button")
                gr.Examples(examples, inputs=[image, prompt], label="Examples (held-out demo samples)",
                            elem_id="examples")
            with gr.Column(scale=2):
                with gr.Row():
                    shown = gr.Image(label="Overlay", type="numpy", format="png", interactive=False, height=300,
                                     elem_id="overlay")
                    heatmap = gr.Plot(label="Heatmap", show_label=False, format="png", elem_id="heatmap")
                about = gr.Markdown(elem_id="summary")
                tokens = gr.Radio([], label="Answer tokens: click one to see its map", visible=False,
                                  interactive=True, elem_id="tokens")
                strip = gr.Gallery(label="Every layer of the chosen method (click one to explain at that layer)",
                                   columns=5, fit_columns=False, height=190, allow_preview=False, format="png",
                                   object_fit="contain", elem_id="layer-strip")
                downloads = gr.File(label="Downloads: the map (.npy), the overlay (.png), the token maps (.npy)",
                                    file_count="multiple", interactive=False, elem_id="downloads")
                with gr.Accordion("Details", open=False):
                    facts = gr.JSON(elem_id="details")

        def explain_page(image_value, prompt_text, answer_text, method_name, auto, layer_value, target_name,
                         samples, noise, per_token_flag, progress=gr.Progress()):
            try:
                request = Request(image=upload_path(image_value), prompt=prompt_text or "",
                                  answer=answer_text or "", method=method_name or "auto",
                                  layer=None if auto else int(layer_value), target=target_name or decoder,
                                  n_samples=int(samples), noise_level=float(noise), per_token=bool(per_token_flag),
                                  name=upload_name(image_value))
                result = explain_request(explorer, request, lambda f, text: progress(f, desc=text))
            except (InputError, ValueError, TypeError, FileNotFoundError) as error:
                raise page_error(error) from error
            chips = [(f"{t.strip() or repr(t)} · p={p:.2f}", i) for i, (t, p) in
                     enumerate(zip(result["tokens"], result["token_probabilities"]))]
            return (result["overlay"], heatmap_figure(result["map"], map_title(result), result["rgb"]),
                    summary(result), details(result), strip_items(result),
                    gr.Radio([("whole answer", WHOLE_ANSWER)] + chips, value=WHOLE_ANSWER, visible=bool(chips),
                             interactive=True),
                    result["files"], result)

        def show_token(result, event: gr.SelectData):
            if result is None:
                raise page_error(InputError("Explain an image first."))
            index = None if event.value in (None, WHOLE_ANSWER) else int(event.value)
            try:
                cam = token_map(result, index)
            except InputError as error:
                raise page_error(error) from error
            title = map_title(result) if index is None else f"token {result['tokens'][index]!r} · {map_title(result)}"
            return overlay(result["rgb"], cam), heatmap_figure(cam, title, result["rgb"])

        def pick_layer(result, event: gr.SelectData):
            if result is None or not 0 <= event.index < len(result["strip_layers"]):
                raise page_error(InputError("Explain an image first."))
            return False, int(result["strip_layers"][event.index])  # the slider's layer, auto off

        def switch_target(target_name):
            count = explorer.layer_count(target_name or decoder)
            return gr.Slider(0, count - 1, value=0, step=1)

        inputs = [image, prompt, answer, method, auto_layer, layer, target, n_samples, noise_level, per_token]
        outputs = [shown, heatmap, about, facts, strip, tokens, downloads, state]
        # preprocess=False: the image arrives as its upload path, read by the package's own checks (load_rgb), so a
        # file that is not an image gets the page's one message instead of Gradio's decoder error.
        # One queue for everything that runs the model, one request at a time (explorer.lock guards it too);
        # progress, and an error's badge, shown once, on the overlay.
        model_queue = dict(concurrency_id="model", concurrency_limit=1)
        shown_on = dict(show_progress_on=[shown], preprocess=False, **model_queue)
        run.click(explain_page, inputs, outputs, api_name="explain", **shown_on)
        tokens.select(show_token, [state], [shown, heatmap], api_visibility="private")
        strip.select(pick_layer, [state], [auto_layer, layer], api_visibility="private").then(
            explain_page, inputs, outputs, api_visibility="private", **shown_on)
        layer.release(lambda: False, None, auto_layer, api_visibility="private")
        target.change(switch_target, [target], [layer], api_visibility="private", **model_queue)
    page.queue(default_concurrency_limit=1, max_size=16)
    return page


def map_title(result: dict) -> str:
    return f"{result['method']} · {layer_name(result['layer'], result['target'])}"
