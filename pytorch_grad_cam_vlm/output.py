"""Output folders: refused before any work when they cannot be written, and filled atomically, so that a failed run
leaves nothing behind and a finished one strands nothing."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator, List, Sequence, Tuple

from pytorch_grad_cam_vlm.errors import InputError

STAGING_PREFIX = ".pytorch-grad-cam-vlm-staging-"
REPORT = "report.json"


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


def earlier_run(out_dir: str, overwrite: bool = False, resume: bool = False) -> Tuple[List[dict], List[str]]:
    """What a run does with the results ``out_dir`` already holds: ``(rows to keep, files to replace)``. A folder
    with a report needs ``overwrite`` (this run's results replace it: its files are stale) or ``resume`` (its rows
    are kept and only the images missing from them are explained); without a report there is nothing to keep."""
    if overwrite and resume:
        raise InputError("--overwrite and --resume exclude each other: replace the results in --out, or add to them.")
    path = os.path.join(out_dir, REPORT)
    if not os.path.isfile(path):
        return [], []
    if not (overwrite or resume):
        raise InputError(f"--out {out_dir} already holds results ({REPORT}): pass --overwrite to replace them, "
                         "--resume to explain only the images missing from them, or choose another folder.")
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError):
        rows = None
    if not isinstance(rows, list) or not all(isinstance(row, dict) and "image" in row for row in rows):
        raise InputError(f"Cannot read the report {path} of the earlier run: move it away, or pass --overwrite "
                         "without --resume.")
    return (rows, []) if resume else ([], [name for row in rows for name in row_files(row)])


def row_files(row: dict) -> List[str]:
    """The files (names inside the output folder) a report row lists."""
    return list(row.get("files") or [row[key] for key in ("map", "overlay") if row.get(key)])


@contextmanager
def staged_output(out_dir: str, stale: Sequence[str] = ()) -> Iterator[str]:
    """A staging folder for the files of a run: inside ``out_dir`` when it exists (the same file system as the
    results, so the final moves are renames even when ``out_dir`` is a mount point), else beside it. On success its
    files move into ``out_dir`` (created if needed, files of the same name replaced; copied where a rename cannot
    cross file systems) and the ``stale`` files of an earlier run that were not replaced are removed from it; on
    any error it is deleted."""
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
    written = os.listdir(staging)
    for name in written:
        source, target = os.path.join(staging, name), os.path.join(out_dir, name)
        try:
            os.replace(source, target)
        except OSError:  # another file system
            shutil.copy2(source, target)
    shutil.rmtree(staging)
    for name in set(stale) - set(written):
        path = os.path.join(out_dir, os.path.basename(name))
        if os.path.isfile(path):
            os.remove(path)
