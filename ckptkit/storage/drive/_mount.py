"""The Drive root and the run's folder on it: what counts as the live mount, and the
only code that changes Drive (each change checked against the mount before and after)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from typing import TypeVar

from ckptkit.errors import StorageError
from ckptkit.storage import drive as _package  # the seams: _copy_file, _digest
from ckptkit.storage.drive._answer import HUNG, Answering, MountHung, answering_for
from ckptkit.storage.local import LocalStorage

T = TypeVar("T")

MARKER = ".ckptkit-drive-root"
COLAB_MOUNT = "/content/drive"


class VerifyError(OSError):
    """The copy on Drive does not match the staged file."""


class MountLost(OSError):
    """The Drive root is not the live mount (unmounted, or a folder left in its place)."""


def mount_point_of(root: str) -> str | None:
    """The mount point whose loss takes ``root`` with it: Colab's ``/content/drive``,
    else the nearest enclosing mount point other than ``/`` (None: nothing to check)."""
    if root == COLAB_MOUNT or root.startswith(COLAB_MOUNT + "/"):
        return COLAB_MOUNT
    path = os.path.realpath(root)  # a root that links to a mount is on that mount
    while True:
        if os.path.ismount(path):
            return None if path == os.path.dirname(path) else path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def mount_problem(root: str, mount: str | None) -> str | None:
    """Why ``root`` is not a mounted folder (missing, or its mount point ``mount`` is
    no longer one)."""
    if mount is not None and not os.path.ismount(mount):
        return f"{mount} is not a mount point"
    if not os.path.isdir(root):
        return "the folder is gone"
    return None


class Mount:
    """The Drive root, told apart from a folder an unmount left in its place by the
    marker file in it: a token recorded in the staging folder when first seen."""

    def __init__(self, root: str, run_staging: str) -> None:
        self.root = root
        # Every check of this root from the loop's threads is bounded (a hung mount
        # blocks a stat forever): one Answering per root and process.
        self.answering: Answering = answering_for(root)
        # While the root is there, as when opened. A root that does not answer has none
        # known: problem() says it hangs (its call is still stuck) until it answers.
        try:
            self.mount_point = self.answering.call(lambda: mount_point_of(root))
        except MountHung:
            self.mount_point = None
        self.marker = os.path.join(root, MARKER)
        self.run_staging = run_staging
        # The token seen in this root, kept next to the runs' staging folders: one record
        # per root (the marker belongs to the Drive, not to a run).
        digest = hashlib.sha1(root.encode()).hexdigest()[:10]
        self.record = os.path.join(os.path.dirname(run_staging), f"drive-root-{digest}.json")
        self.token: str | None = None
        # The root's filesystem while this process writes: a folder put in its place
        # on local disk has another one. (Not kept across processes: a remount may
        # change it; and not the inode, which a FUSE daemon may renumber.)
        self.device: int | None = None

    def _read_marker(self) -> str | None:
        try:
            with open(self.marker, "rb") as f:
                return f.read(200).decode("ascii", "replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _recorded(self) -> str | None:
        try:
            with open(self.record, encoding="utf-8") as f:
                return str(json.load(f)["marker"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _answered(self, check: Callable[[], str | None]) -> str | None:
        """``check()`` on the mount, bounded: a mount that does not answer is a problem."""
        try:
            return self.answering.call(check)
        except MountHung as exc:
            return str(exc)

    def known_problem(self) -> str | None:
        """Why the root is not the one the staging folder recorded (a read: readers ask
        too), or None; also None when the staging has no record of this root yet."""
        return self._answered(self._known_problem)

    def _known_problem(self) -> str | None:
        if problem := mount_problem(self.root, self.mount_point):
            return problem
        recorded = self._recorded()
        found = self._read_marker()
        if recorded is None:
            return None
        if found is None:
            return f"{MARKER} is missing: an empty folder left by an unmount?"
        if found != recorded:
            return f"{MARKER} is not the one the staged uploads were made for"
        return None

    def establish(self) -> None:
        """Learn the marker's token, creating the marker when neither the root nor this
        staging folder has seen one (raise :class:`MountLost` when it is not the root
        the staging knows, or does not answer). Only a writer calls this."""
        if problem := self.known_problem():
            raise MountLost(problem)
        try:
            self.answering.call(self._establish)
        except MountHung as exc:
            raise MountLost(str(exc)) from None

    def _establish(self) -> None:
        recorded = self._recorded()
        found = self._read_marker()
        if found is None:
            found = uuid.uuid4().hex
            try:  # in the existing root only: O_CREAT never creates the folder
                fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:  # another process was first: use its token
                found = self._read_marker() or ""
            else:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(found + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        self.token = found
        self.device = os.stat(self.root).st_dev
        if recorded != found:
            tmp = f"{self.record}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"root": self.root, "marker": found}, f)
            os.replace(tmp, self.record)

    def problem(self) -> str | None:
        """Why the root is not the live mount now (after :meth:`establish`), or None;
        also when it does not answer within the limit (``_answer``)."""
        return self._answered(self._problem)

    def _problem(self) -> str | None:
        if problem := mount_problem(self.root, self.mount_point):
            return problem
        with contextlib.suppress(OSError):
            if self.device is not None and os.stat(self.root).st_dev != self.device:
                return "the folder is on another filesystem now"
        found = self._read_marker()
        if found is None:
            return f"{MARKER} is missing: an empty folder left by an unmount?"
        if found != self.token:
            return f"{MARKER} is not the one the staged uploads were made for"
        return None

    def lost(self, url: str, why: BaseException | str) -> StorageError:
        """The one-line error for a root that is not the live mount (or hangs)."""
        if isinstance(why, MountHung) or str(why).startswith(HUNG):
            return StorageError(
                f"{url}: Google Drive at {self.root} does not answer ({why}): remount it "
                f"(in Colab: drive.mount('/content/drive', force_remount=True), or restart "
                f"the runtime), then rerun: the staged uploads in {self.run_staging} replay"
            )
        return StorageError(
            f"{url}: Google Drive is not mounted at {self.root} any more ({why}): remount "
            f"it (in Colab: drive.mount('/content/drive')), then rerun: the staged uploads "
            f"in {self.run_staging} replay"
        )

    def check(self) -> None:
        """Raise :class:`MountLost` unless the root is the live mount."""
        if problem := self.problem():
            raise MountLost(problem)


def mkdirs_on_drive(folder: str) -> None:
    """Create ``folder`` and its missing parents, only below an existing folder that is
    (or lies below) a Drive root holding the marker: a vanished root, or the empty
    folder an unmount left, is never filled in."""
    missing: list[str] = []
    path = folder
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not missing:
        return
    base = path
    while not os.path.isfile(os.path.join(base, MARKER)):
        if os.path.dirname(base) == base:
            raise MountLost(f"{path} holds no {MARKER}: not below a mounted Drive root")
        base = os.path.dirname(base)
    for path in reversed(missing):
        try:
            os.mkdir(path)  # never makedirs: its parent must exist
        except FileExistsError:
            if not os.path.isdir(path):
                raise


class DriveFolder:
    """The run's folder on the mount, as the uploader changes it: every change checks
    that the root is the live mount before and after, and creates folders only below
    the root (never the root itself)."""

    def __init__(self, mount: Mount, target: str) -> None:
        self.mount = mount
        self.files = LocalStorage(target)  # reads, and the path of each key

    def path(self, key: str) -> str:
        return self.files.local_path(key) or ""

    def _checked(self, fn: Callable[[], T]) -> T:
        self.mount.check()
        out = fn()
        self.mount.check()  # the change landed on the live mount, not on a stand-in
        return out

    def _write(self, key: str, data: bytes, *, exclusive: bool) -> bool:
        path = self.path(key)
        mkdirs_on_drive(os.path.dirname(path))
        # Never through a symlink: the run lock is written here.
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        flags |= os.O_EXCL if exclusive else os.O_TRUNC
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def upload(self, staged: str, key: str, size: int) -> None:
        """Copy a staged file to Drive and read it back (size + sha256)."""

        def copy() -> None:
            dst = self.path(key)
            sha = _package._copy_file(staged, dst)
            if _package._digest(dst) != (size, sha):
                raise VerifyError(f"{dst}: read back bytes that do not match the staged file")

        self._checked(copy)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._checked(lambda: self._write(key, data, exclusive=False))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        return self._checked(lambda: self._write(key, data, exclusive=True))

    def delete(self, key: str, recursive: bool = False) -> None:
        self._checked(lambda: self.files.delete(key, recursive=recursive))

    def mkdir(self, key: str) -> None:
        self._checked(lambda: mkdirs_on_drive(self.path(key)))

    def rename(self, src: str, dst: str) -> None:
        self._checked(lambda: self.files.rename(src, dst))
