"""Output folders: refused before any work when they cannot be written, and filled atomically, so that a failed run
leaves nothing behind and a finished one strands nothing."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator

from pytorch_grad_cam_vlm.errors import InputError

STAGING_PREFIX = ".pytorch-grad-cam-vlm-staging-"


def check_out_dir(out_dir: str) -> None:
    """Refuse ``out_dir`` when it is a file, or when its nearest existing folder cannot be written (read-only file
    system, no permission): tried by creating and removing an empty folder there."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out {out_dir} is a file, not a folder.")
    existing = os.path.abspath(out_dir)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pytorch-grad-cam-vlm-probe-", dir=existing))
    except OSError as error:
        raise InputError(f"--out {out_dir}: cannot write in {existing} ({error.strerror}); choose a writable "
                         "folder.") from error


@contextmanager
def staged_output(out_dir: str) -> Iterator[str]:
    """A staging folder for the files of a run: inside ``out_dir`` when it exists (the same file system as the
    results, so the final moves are renames even when ``out_dir`` is a mount point), else beside it. On success its
    files move into ``out_dir`` (created if needed, files of the same name replaced; copied where a rename cannot
    cross file systems); on any error it is deleted."""
    existed = os.path.isdir(out_dir)
    parent = out_dir if existed else os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, STAGING_PREFIX + uuid.uuid4().hex[:12])
    os.mkdir(staging)  # not tempfile.mkdtemp: its 0700 mode would stay on the output folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not existed:
        try:
            os.rename(staging, out_dir)
            return
        except OSError:
            os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(staging):
        source, target = os.path.join(staging, name), os.path.join(out_dir, name)
        try:
            os.replace(source, target)
        except OSError:  # another file system
            shutil.copy2(source, target)
    shutil.rmtree(staging)
