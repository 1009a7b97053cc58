"""The one guard every path a command writes passes through, before the work is done.

An output is never an input of the same call (the same file, by device and
inode; or an image inside an input folder), never an existing file of another
kind (formats.KINDS: a result JSON only over a result JSON, a cache only over a
cache) unless the call was told to overwrite, never the same path as another
output of the call, and never an input folder when it is a folder. The
folders a call made for its outputs are removed again when it fails, so a
failed run leaves nothing behind. `locked` keeps a second process off an
output that one is writing.
"""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path

from spherecli.core.errors import UserError
from spherecli.core.formats import KINDS, is_kind
from spherecli.core.images import is_image_name


class Outputs:
    """The outputs of one call, checked against its inputs. Used as a context: on an
    error the folders made for the outputs are removed again (those still empty).

    overwrite: True or False where the command has an --overwrite option (False: an
    existing file of another kind is refused, and the message offers the option),
    None where it has none.
    """

    def __init__(self, inputs=(), overwrite: bool | None = None):
        self.overwrite = overwrite
        self.input_files: set[tuple[int, int]] = set()
        self.input_folders: list[Path] = []
        for p in inputs:
            if p is None:
                continue
            try:
                st = os.stat(p)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                self.input_folders.append(Path(p).resolve())
            else:
                self.input_files.add((st.st_dev, st.st_ino))
        self.claimed: set[Path] = set()
        self.made: list[Path] = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is not None and not isinstance(error, KeyboardInterrupt):
            self.undo()
        return False

    def undo(self) -> None:
        """Remove the folders made for the outputs, deepest first, where nothing was written."""
        for folder in reversed(self.made):
            try:
                folder.rmdir()
            except OSError:
                pass
        self.made.clear()

    def is_input(self, path: Path) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) in self.input_files:
            return True
        real = path.resolve()
        return is_image_name(path.name) and any(real.is_relative_to(f) for f in self.input_folders)

    def file(self, path: str | Path, kind: str) -> Path:
        """Check one output file of a kind of formats.KINDS; make its folder."""
        path = Path(path)
        what, suffixes = KINDS[kind].what, KINDS[kind].suffixes
        self._claim(path)
        if suffixes and path.suffix.lower() not in suffixes:
            raise UserError(f"{path}: {what} is written to a file named {' or '.join(suffixes)}")
        if path.is_dir():
            raise UserError(f"cannot write {path}: it is a folder")
        if self.is_input(path):
            raise UserError(f"{path} is an input of this command; write {what} elsewhere")
        if path.is_symlink() and not path.exists():
            raise UserError(f"{path} is a link to nothing ({os.readlink(path)}); write elsewhere")
        if path.exists() and not self.overwrite and not is_kind(path, kind):
            remedy = "add `overwrite` to replace it" if self.overwrite is False else "remove it first"
            which = "" if KINDS[kind].test is None else f" and is not {what}"
            raise UserError(f"{path} exists{which}; it is left as it is ({remedy}, or write elsewhere)")
        self._make(path.parent, path)
        return path

    def folder(self, path: str | Path) -> Path:
        """Check an output folder: not a file, not an input folder; make it."""
        path = Path(path)
        self._claim(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"cannot write into {path}: it is a file, not a folder")
        if path.resolve() in self.input_folders:
            raise UserError(f"{path} is the input folder: its files would be replaced by the outputs; "
                            "write elsewhere")
        self._make(path, path)
        return path

    def _claim(self, path: Path) -> None:
        real = path.resolve()
        if real in self.claimed:
            raise UserError(f"{path} is given as two outputs of this command; give each its own path")
        self.claimed.add(real)

    def _make(self, folder: Path, target: Path) -> None:
        missing = []
        probe = folder
        while not probe.exists() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write {target}: {e.strerror or e}") from None
        self.made.extend(reversed(missing))
        if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise UserError(f"cannot write {target}: permission denied")


@contextmanager
def locked(path: str | Path, what: str):
    """Hold PATH.lock while writing PATH: a second process writing the same output is
    refused, saying who holds it; a lock whose process is gone is taken over."""
    import socket
    import sys
    import time

    lock = Path(str(path) + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {lock}: {e.strerror or e}") from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)[:300]}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if not isinstance(holder, dict) or "pid" not in holder:
                raise UserError(f"{lock} exists and is not a spherecli lock; it is left as it is (remove "
                                "it, or write elsewhere)") from None
            if holder.get("host") != me["host"] or _running(holder.get("pid")):
                raise UserError(f"{path} is being written by another {what} (pid {holder.get('pid')} on "
                                f"{holder.get('host')}, since {holder.get('started')}: "
                                f"{holder.get('command')}); wait for it to finish, or remove {lock} if that "
                                "process is gone") from None
            lock.unlink(missing_ok=True)  # its process is gone: a stale lock
        except OSError as e:
            raise UserError(f"cannot write {lock}: {e.strerror or e}") from None
    else:
        raise UserError(f"could not take {lock}")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _running(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
