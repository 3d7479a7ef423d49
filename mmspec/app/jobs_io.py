"""Crash-safe files for batch jobs (:mod:`mmspec.app.jobs`): durable JSONL appends, torn-line recovery,
an exclusive lock on a job's output folder, atomic rewrites, and lazy image loading with a pixel
limit.

Guarantees (tested by killing real jobs with SIGKILL, ``tests/core/test_jobs_reliability.py``):

* a record is written with one ``write`` of whole lines, then flushed and ``fsync``-ed, so a crash
  can only ever tear the *last* line of a file;
* a torn last line is ignored when reading (and reported), and cut off by the process that owns
  the file before it appends again;
* files rewritten as a whole (``stats.json``, ``captions.jsonl``) go through write-then-rename, so
  a reader sees the old or the new version, never half of one;
* one process at a time writes a given rank's files of an output folder: a second job started on
  the same folder is refused with a message naming the process that holds it.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

#: Largest image side the batch jobs decode by default: the chat demo's upload limit.
DEFAULT_MAX_IMAGE_SIDE = 4096


class JobLockedError(RuntimeError):
    """Another live process holds the output folder's lock."""


@dataclass
class JsonlContents:
    """What :func:`read_jsonl` found: the parsed ``records`` and, if the file ended in an incomplete
    line, that line's text (``torn``) and its byte offset (``torn_offset``)."""

    records: list[dict] = field(default_factory=list)
    torn: str | None = None
    torn_offset: int | None = None


def read_jsonl(path: Path) -> JsonlContents:
    """Parse a JSONL file written by :func:`append_jsonl`.

    Only the final line may be incomplete (no newline, or not valid JSON): it is left out of
    ``records`` and returned in ``torn``. A bad line anywhere else is real corruption and raises
    ``ValueError`` naming the file and the line.
    """
    path = Path(path)
    out = JsonlContents()
    if not path.exists():
        return out
    data = path.read_bytes()
    complete, newline, tail = data.rpartition(b"\n")
    if tail:  # no newline after the last bytes: the write was cut short
        out.torn, out.torn_offset = tail.decode("utf-8", "replace"), len(complete) + len(newline)
    for number, raw in enumerate(complete.split(b"\n") if newline else [], 1):
        if not raw.strip():
            continue
        try:
            out.records.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{path}: line {number} is not valid JSON ({err}); only a crash-torn last "
                "line is repaired automatically: fix or delete that line"
            ) from None
    return out


def repair_jsonl(path: Path) -> str | None:
    """Cut an incomplete last line off ``path`` (only the file's owner may do this, under the folder
    lock); returns the removed text, or None if the file was whole."""
    contents = read_jsonl(path)
    if contents.torn is None:
        return None
    with open(path, "r+b") as f:
        f.truncate(contents.torn_offset)
        f.flush()
        os.fsync(f.fileno())
    return contents.torn


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append ``records`` as one write of whole lines, then flush and fsync.

    If the file does not end with a newline (another writer's crash), a newline is written first
    so the new records never merge into the torn line.
    """
    if not records:
        return
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    payload = b"\n" + payload
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a fsync-ed temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_image_atomic(image, path: Path) -> None:
    """Save a PIL image through a temporary file and a rename: a crash never leaves half a PNG."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete ``.NAME.<pid>.tmp`` files (from :func:`write_atomic` and image saves) whose writer is
    no longer alive, i.e. left by a crashed job; returns them."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        pid = path.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``out_dir/.mmspec-job.<rank>.lock``.

    The lock file records the holder's pid and command line so the refusal can name it. The
    kernel drops the lock when the holder exits, however it exits (SIGKILL included), so a
    crashed job never leaves a stale lock behind. Re-entrant within a process (the command takes
    the lock before loading its model, the job loop takes it again).
    """

    _held: ClassVar[dict[str, list]] = {}  # lock path -> [fd, depth], for this process

    def __init__(self, out_dir: Path, rank: int = 0) -> None:
        self.path = Path(out_dir) / f".mmspec-job.{rank}.lock"
        self._key = str(self.path.resolve())
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        if self._key in self._held:
            self._held[self._key][1] += 1
            self._fd = self._held[self._key][0]
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            who = (
                f"process {holder.get('pid', '?')} ({holder.get('command', 'unknown command')}, "
                f"started {holder.get('started', '?')})"
            )
            raise JobLockedError(
                f"output folder {self.path.parent} is in use by another mmspec job: {who}. Wait for it to "
                "finish (or stop it), or choose another --output-dir; run data-parallel jobs with "
                "`accelerate launch` so their processes split the items."
            ) from None
        os.ftruncate(fd, 0)
        info = {
            "pid": os.getpid(),
            "command": " ".join(sys.argv)[:300],
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        self._held[self._key] = [fd, 1]
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self._fd = None
        entry = self._held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[self._key]
            os.close(entry[0])  # closing the descriptor drops the flock

    def __enter__(self):  # returns the lock
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_image(path: str, max_side: int = DEFAULT_MAX_IMAGE_SIDE) -> str:
    """Check that ``path`` is an image no larger than ``max_side`` pixels a side, from its header
    only (no pixel is decoded); returns the path. ``ValueError`` with the reason otherwise."""
    import PIL.Image

    try:
        with _no_pil_bomb_limit(), PIL.Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError) as err:  # missing, unreadable or not an image
        raise ValueError(f"cannot read image {path}: {err}") from None
    if max(width, height) > max_side:
        raise ValueError(
            f"image {path} is {width}x{height} pixels; the limit is {max_side} pixels a side (--max-image-side)"
        )
    return path


def load_image(path: str, max_side: int = DEFAULT_MAX_IMAGE_SIDE):
    """Decode ``path`` as a PIL image after :func:`check_image`, in its own mode (the VLM processor
    converts it as ``processor(...)`` does: transparent pixels composited onto white, not dropped);
    ``ValueError`` if it is unreadable, too large, truncated or corrupt."""
    import PIL.Image

    check_image(path, max_side)
    try:
        with _no_pil_bomb_limit(), PIL.Image.open(path) as image:
            image.load()  # decode now: truncated or corrupt pixel data fails here
            return image.copy()
    except (OSError, ValueError) as err:  # truncated or corrupt pixel data
        raise ValueError(f"cannot decode image {path}: {err}") from None


class _no_pil_bomb_limit:
    """PIL's own decompression-bomb guard raises (or warns) from ``open``; the size is checked by
    :func:`check_image` instead, with a message that names the limit and its option."""

    def __enter__(self) -> None:
        import PIL.Image

        self._saved = PIL.Image.MAX_IMAGE_PIXELS
        PIL.Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc: object) -> None:
        import PIL.Image

        PIL.Image.MAX_IMAGE_PIXELS = self._saved
