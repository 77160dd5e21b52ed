"""A local directory as a `Dir`: atomic writes by rename, conditional writes by link() and flock()."""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import SafeMergeError
from .dirs import BYTES_READ, TMP_PREFIX, sha256_of


class LocalDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.local_path: Path | None = self.path
        self.uri = str(self.path)

    def arrow_location(self, name: str) -> tuple[str, object | None]:
        return str(self.path / name), None

    def _file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return self._file(name).is_file()

    def size(self, name: str) -> int:
        return self._stat(name).st_size

    def _stat(self, name: str) -> os.stat_result:
        try:
            return self._file(name).stat()
        except FileNotFoundError:
            raise SafeMergeError(f"missing file: {self._file(name)}") from None

    def read(self, name: str) -> bytes:
        try:
            data = self._file(name).read_bytes()
        except FileNotFoundError:
            raise SafeMergeError(f"missing file: {self._file(name)}") from None
        BYTES_READ.add(len(data))
        return data

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        want = len(buffer)
        with open(self._file(name), "rb", buffering=0) as f:
            f.seek(offset)
            got = 0
            while got < want:
                n = f.readinto(buffer[got:])
                if not n:
                    raise SafeMergeError(
                        f"{self._file(name)}: file ends after {offset + got} bytes, "
                        f"expected at least {offset + want} (truncated?)"
                    )
                got += n
        BYTES_READ.add(want)

    def list(self) -> builtins.list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_file())

    def subdirs(self) -> builtins.list[str]:
        if not self.path.is_dir():
            return []
        # lstat first: a link (to another team's adapter, to /etc) is neither followed nor stat'ed.
        return sorted(p.name for p in self.path.iterdir()
                      if not p.is_symlink() and p.is_dir() and not p.name.startswith("."))

    def links(self) -> builtins.list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_symlink() and not p.name.startswith("."))

    def child(self, name: str) -> LocalDir:
        return LocalDir(self.path / name)

    def write(self, name: str, data: bytes, staged: bool = False) -> None:
        tmp = self._staged_copy(name, data)
        try:
            os.replace(tmp, self._file(name))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def unstage(self, name: str) -> None:
        pass  # locally a run's files are only ever reached through its manifest and pointers

    def version_tag(self, name: str) -> str:
        st = self._stat(name)
        return f"{st.st_size}:{st.st_mtime_ns}"

    def walk(self, under: str = "") -> builtins.list[str]:
        root = self.path / under
        if not root.is_dir():
            return []
        return sorted(p.relative_to(self.path).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())

    def delete(self, names: builtins.list[str]) -> None:
        parents = set()
        for name in names:
            self._file(name).unlink(missing_ok=True)
            parents.add(self._file(name).parent)
        for parent in sorted(parents, key=lambda p: -len(p.parts)):  # empty directories go too
            while parent != self.path and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def write_all(self, files: dict[str, bytes], last: str) -> None:
        # The directory is built beside its place and replaces it in one rename: all of it, or the old one.
        with staged_dir(self.path) as stage:
            for name, data in files.items():
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                (stage / name).write_bytes(data)

    def _staged_copy(self, name: str, data: bytes) -> Path:
        """`data` in a temporary file beside `name`'s place (a short name, whatever the target's): complete
        before anything links or renames it; nothing is left behind if writing it fails."""
        target = self._file(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            tmp.write_bytes(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def create_exclusive(self, name: str, data: bytes) -> str | None:
        # link() fails if the name exists, and the file it links is already whole: no reader ever finds
        # the object empty (O_EXCL and a write after it would let one).
        tmp = self._staged_copy(name, data)
        try:
            os.link(tmp, self._file(name))
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        return sha256_of(data)

    def read_tagged(self, name: str) -> tuple[bytes, str] | None:
        try:
            data = self._file(name).read_bytes()
        except FileNotFoundError:
            return None
        return data, sha256_of(data)

    def replace_if_match(self, name: str, data: bytes, tag: str) -> str | None:
        # Compare and swap under an exclusive flock() of the file being replaced: a second replacer waits on
        # the same file, then finds that the name now leads to another file (or other bytes), and loses.
        target = self._file(name)
        try:
            fd = os.open(target, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same_file = os.stat(target).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                current = f.read()
            if not same_file or sha256_of(current) != tag:
                return None
            self.write(name, data)
            return sha256_of(data)
        finally:
            os.close(fd)  # releases the flock


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh staging directory beside `out`; on success it replaces `out` in one rename."""
    stage = out.parent / f".{out.name[:64]}.partial-{uuid.uuid4().hex[:8]}"  # short, whatever the name
    stage.mkdir()
    old = None
    try:
        yield stage
        if out.exists():
            old = out.parent / f".{out.name[:64]}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        stage.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)  # the swap failed half-way: put the previous output back
        raise
