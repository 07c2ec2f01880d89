"""``pytorch-grad-cam-vlm app``: the interactive explorer, a local web page (Gradio, the optional ``app`` extra) on
one model loaded once. It listens on 127.0.0.1; another host or a public share link needs ``--allow-public``. Every
file it writes (uploads, examples, maps) goes to one temporary folder, removed when it stops, and nothing is sent
anywhere (Gradio's analytics, run history, MCP server and share link are off)."""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Iterator, List, Optional

from pytorch_grad_cam_vlm.cli.common import PROG, _positive_int, add_loading_arguments
from pytorch_grad_cam_vlm.errors import InputError

EXAMPLES = 3  # held-out demo samples offered as examples
# Gradio reads these when it builds the page: no telemetry, no version check, nothing kept between runs.
QUIET_ENVIRONMENT = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
                     "GRADIO_RUN_HISTORY": "False", "GRADIO_MCP_SERVER": "False", "GRADIO_SHARE": "False"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only: ``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_exposure(host: str, share: bool, allow_public: bool) -> Optional[str]:
    """Refuse a non-loopback ``host`` or a share link without ``allow_public``; with it, the warning to print."""
    public = [what for what, on in ((f"--host {host}", not is_loopback(host)), ("--share", share)) if on]
    if not public:
        return None
    if not allow_public:
        raise InputError(f"{' and '.join(public)} would let other machines reach the explorer and run the model: "
                         "pass --allow-public too if you mean it (default: 127.0.0.1 only).")
    return (f"{' and '.join(public)}: the explorer is reachable beyond this machine; anyone who can reach it can "
            "upload images and run the model. It has no login: stop it when done.")


def write_examples(folder: str, n: int = EXAMPLES, captions: bool = False) -> List[List[str]]:
    """``n`` held-out demo samples as PNG files in ``folder``: ``[path, prompt]`` rows for the page's examples (with
    ``captions``, for CLIP models: one caption per shape instead of the question)."""
    from PIL import Image

    from pytorch_grad_cam_vlm.demo import SHAPES, make_demo_samples

    os.makedirs(folder, exist_ok=True)
    rows = []
    for i, sample in enumerate(make_demo_samples(n, seed=0, split="test")):
        path = os.path.join(folder, f"demo_sample{i}.png")
        Image.fromarray(sample.image).save(path)
        rows.append([path, "\n".join(f"a red {shape}" for shape in SHAPES) if captions else sample.prompt])
    return rows


def open_explorer(args: argparse.Namespace, work_dir: str):
    """The model of ``--model`` checked by its config, then loaded once, as an
    :class:`~pytorch_grad_cam_vlm.cli.explorer.Explorer`."""
    from pytorch_grad_cam_vlm.cli.explorer import Explorer
    from pytorch_grad_cam_vlm.demo import embedded_model_path
    from pytorch_grad_cam_vlm.models.registry import load_model, model_config, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    path = embedded_model_path(args.model)
    _, family = model_config(path)
    model, processor = load_model(path, family, resolve_dtype(args.dtype, device), device, args.allow_pickle,
                                  args.trust_remote_code)
    return Explorer(model, processor, family, args.model, work_dir)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt inside, as the page says, even where the shell started the app in
    the background: a non-interactive shell starts background jobs with SIGINT ignored (POSIX), and Python then
    installs no handler of its own. The handler before is put back after; off the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def run_app(args: argparse.Namespace) -> int:
    """Serve the explorer until Ctrl-C (or ``--stop-after`` seconds), then remove its temporary folder."""
    warning = check_exposure(args.host, args.share, args.allow_public)
    work_dir = tempfile.mkdtemp(prefix="pytorch-grad-cam-vlm-app-")
    # Before Gradio is imported: some of its modules read the temporary folder when imported.
    os.environ.update(QUIET_ENVIRONMENT, GRADIO_TEMP_DIR=os.path.join(work_dir, "gradio"))
    page = None
    try:
        try:
            from pytorch_grad_cam_vlm.cli.explorer_page import PAGE_CSS, build_page
        except ImportError as error:
            if getattr(error, "name", None) != "gradio":
                raise
            raise InputError("The explorer needs Gradio: pip install \"pytorch-grad-cam-vlm[app]\".") from error
        explorer = open_explorer(args, work_dir)
        page = build_page(explorer, write_examples(os.path.join(work_dir, "examples"),
                                                   captions=not explorer.takes_prompt))
        if warning:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        try:
            _, local_url, share_url = page.launch(
                server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                quiet=True, show_error=True, max_file_size=f"{args.max_upload_mb}mb", allowed_paths=[work_dir],
                ssr_mode=False, mcp_server=False, pwa=False, run_history=False, enable_monitoring=False,
                footer_links=["api", "settings"], css=PAGE_CSS)
        except OSError as error:
            raise InputError(f"Cannot listen on {args.host}:{args.port}: {str(error).splitlines()[0]} (pass another "
                             "--port).") from error
        print(f"The explorer of {args.model} runs at {local_url}" + (f" and {share_url}" if share_url else "")
              + (f" for {args.stop_after} s" if args.stop_after else "") + "; Ctrl-C stops it.", flush=True)
        deadline = time.monotonic() + args.stop_after if args.stop_after else float("inf")
        with interruptible():
            try:
                while time.monotonic() < deadline:
                    time.sleep(0.2)
            except KeyboardInterrupt:
                pass
        print("The explorer stopped.", flush=True)
        return 0
    finally:
        if page is not None:
            page.close()
        shutil.rmtree(work_dir, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``app`` options, and :func:`run_app` as the parser's ``run`` default."""
    parser.add_argument("--model", default="demo", help="model folder, Hugging Face hub id, or demo (default)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; any other needs "
                             "--allow-public)")
    parser.add_argument("--port", type=_positive_int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public Gradio share link (needs --allow-public)")
    parser.add_argument("--allow-public", action="store_true",
                        help="allow a non-loopback --host or --share: anyone who reaches the page can run the model")
    parser.add_argument("--max-upload-mb", type=_positive_int, default=16,
                        help="largest upload in megabytes (default 16)")
    parser.add_argument("--stop-after", type=_positive_int,
                        help="stop the server after this many seconds (default: run until Ctrl-C)")
    add_loading_arguments(parser)
    parser.set_defaults(run=run_app)
    return parser
