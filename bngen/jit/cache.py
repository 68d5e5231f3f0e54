"""The on-disk store of compiled kernels: a thin wrapper around `Compiler.compile`.

Layout: ``<root>/<key[:2]>/<key>/`` holding the generated C, the shared object, the
spec as JSON and a manifest written last (size and SHA-256 of the shared object).  An
entry is published whole with one ``os.replace`` of a directory built beside it, under a
per-key file lock, so concurrent builders compile once and nobody loads a partial file.
An entry whose shared object does not match its manifest is rebuilt.

A shared object from the cache runs in the process that loads it, so the cache trusts
only what this user wrote: the root, shard and entry directories and the entry's files
must be owned by the current user and writable by nobody else (as Jinja's bytecode cache
and pip check), and the manifest must name the file named for the key inside the entry.
A root that fails this is not used (a private temporary directory is, with a
`CacheWarning`); an entry that fails it is rebuilt.  The manifest's SHA-256 sits beside
the file it checks, so it catches accidents, not attackers: the ownership rule does that.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import filelock
import platformdirs

FORMAT_VERSION = "1"  # bump when the cache layout or generated-code conventions change
ENV_VAR = "BNGEN_CACHE_DIR"
MANIFEST = "manifest.json"


class CacheWarning(UserWarning):
    """The cache directory cannot be used; kernels go to a temporary directory."""


def resolve_root(cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """`cache_dir` if given, else ``$BNGEN_CACHE_DIR``, else the user cache directory."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("bngen", appauthor=False))


def digest(*parts: str) -> str:
    """The cache key: SHA-256 over the parts, each length-prefixed so none can bleed into the next."""
    h = hashlib.sha256()
    for part in (FORMAT_VERSION, *parts):
        data = part.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# Unusable cache roots, and the temporary directory this process uses instead of each.
_FALLBACKS: Dict[Path, Path] = {}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def insecure(path: Path, follow: bool = True) -> Optional[str]:
    """Why `path` cannot be trusted to hold code this process runs, or None: it must be
    owned by the current user and not writable by group or others (and, unless `follow`,
    not a symbolic link).  Raises OSError if it cannot be examined (missing, ...)."""
    st = os.stat(path) if follow else os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "group and others" if st.st_mode & 0o022 == 0o022 else "group" if st.st_mode & stat.S_IWGRP else "others"
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def write_private(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename, readable by all
    and writable by this user only, whatever the umask."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fchmod(fd, 0o644)  # a umask of 002 would otherwise leave it group-writable
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if fd != -1:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


class _Untrusted(OSError):
    """A cache directory that others can write into (or that another user owns)."""


class Cache:
    """Compiled kernels under one root directory."""

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lookup(self, key: str, object_name: Optional[str] = None) -> Optional[Path]:
        """The shared object of a complete, intact and trusted entry, or None.
        `object_name`: the file the entry's object must be (the manifest names it)."""
        try:
            if insecure(self.root) is not None:
                return None
        except OSError:
            return None
        return _verified(self.entry(key), object_name)

    def fetch(self, key: str, compile: Callable[[Path], Path], files: Mapping[str, str],
              object_name: Optional[str] = None) -> Path:
        """The shared object for `key`, compiling it with `compile(directory)` on a miss.

        `files` (name -> text) are stored beside it for people reading the cache;
        `object_name` is the file name the object must have.  Falls back to a private
        temporary directory, with a `CacheWarning`, if the root is not writable or not
        trusted (see the module's docstring).
        """
        found = self.lookup(key, object_name)
        if found is not None:
            return found
        try:
            return self._publish(self.root, key, compile, files, object_name)
        except OSError as exc:  # unwritable, read-only file system, a file in the way, untrusted...
            fallback = _FALLBACKS.get(self.root)
            if fallback is None:  # mkdtemp: mode 0700, this user's
                fallback = _FALLBACKS[self.root] = Path(tempfile.mkdtemp(prefix="bngen-cache-"))
                reason = str(exc) if isinstance(exc, _Untrusted) else exc.strerror or exc
                warnings.warn(
                    f"bngen cache directory {self.root} is not usable ({reason}); "
                    f"using {fallback} for this process. Set {ENV_VAR} or pass cache_dir= to choose another.",
                    CacheWarning,
                    stacklevel=4,
                )
            return self._publish(fallback, key, compile, files, object_name)

    def discard(self, key: str) -> None:
        """Removes the entry of `key` (damaged: its object does not import), under its lock."""
        shard = self.entry(key).parent
        try:
            with filelock.FileLock(str(shard / f"{key}.lock")):
                shutil.rmtree(self.entry(key), ignore_errors=True)
        except OSError:
            pass  # an unusable root: the next fetch falls back

    @staticmethod
    def _publish(root: Path, key: str, compile: Callable[[Path], Path], files: Mapping[str, str],
                 object_name: Optional[str]) -> Path:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        shard = root / key[:2]
        shard.mkdir(exist_ok=True, mode=0o700)
        for directory in (root, shard):
            why = insecure(directory, follow=directory is root)
            if why is not None:
                raise _Untrusted(why)
        target = shard / key
        with filelock.FileLock(str(shard / f"{key}.lock")):
            found = _verified(target, object_name)
            if found is not None:  # another process built it while we waited
                return found
            if os.path.lexists(target):  # damaged, partial or untrusted: rebuild from scratch
                _remove(target)
            for stale in shard.glob(f".{key}-*"):  # work directories of builds that were killed
                shutil.rmtree(stale, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=shard))
            try:
                for name, text in files.items():
                    (work / name).write_text(text)
                shared = compile(work)
                if object_name is not None and shared.name != object_name:
                    raise RuntimeError(f"bngen: compiled {shared.name}, expected {object_name}")  # a bug, not input
                manifest = {"object": shared.name, "size": shared.stat().st_size, "sha256": _file_digest(shared)}
                (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
                for path in work.iterdir():  # whatever the umask: writable by this user only
                    os.chmod(path, stat.S_IMODE(path.stat().st_mode) & ~0o022)
                os.replace(work, target)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        return target / shared.name

    def entries(self):
        """Every complete entry directory under the root."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent for p in self.root.glob(f"??/*/{MANIFEST}"))

    def size(self) -> int:
        """Bytes used under the root."""
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def clear(self) -> Tuple[int, int]:
        """Removes every entry, and the work directories of builds that were killed, except
        those of keys being built right now (whose lock another process holds: removing
        their work directory would fail that build).  Returns (removed, skipped) entries."""
        removed = skipped = 0
        if not self.root.is_dir():
            return removed, skipped
        for shard in sorted(self.root.iterdir()):
            if shard.is_file() and shard.name.startswith("compiler-"):
                shard.unlink(missing_ok=True)
            if not (shard.is_dir() and not shard.is_symlink() and len(shard.name) == 2):
                continue
            keys = {p.name.split("-")[0].lstrip(".") for p in shard.iterdir() if p.is_dir()}
            for key in sorted(keys):
                lock = filelock.FileLock(str(shard / f"{key}.lock"))
                try:
                    lock.acquire(timeout=0)
                except filelock.Timeout:
                    skipped += (shard / key / MANIFEST).is_file()
                    continue
                try:
                    removed += (shard / key / MANIFEST).is_file()
                    _remove(shard / key)
                    for stale in shard.glob(f".{key}-*"):
                        shutil.rmtree(stale, ignore_errors=True)
                finally:
                    lock.release()
        return removed, skipped


def _remove(path: Path) -> None:
    """Removes an entry directory, or whatever is in its place (a file, a symbolic link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _verified(entry: Path, object_name: Optional[str] = None) -> Optional[Path]:
    """The object of `entry` if the entry is trusted and intact: the shard, the entry, its
    manifest and object are this user's and nobody else's to write, and the manifest names
    `object_name` (any plain file name if None) with the object's size and digest."""
    try:
        for path in (entry.parent, entry):
            if insecure(path, follow=False) is not None:
                return None
        manifest = json.loads((entry / MANIFEST).read_text())
        name = manifest["object"]
        if not isinstance(name, str) or name != (object_name or os.path.basename(name)) or name in ("", ".", ".."):
            return None  # another key's object, an absolute path, or one leading out of the entry
        shared = entry / name
        for path in (entry / MANIFEST, shared):
            if insecure(path, follow=False) is not None or not stat.S_ISREG(os.lstat(path).st_mode):
                return None
        if shared.stat().st_size == manifest["size"] and _file_digest(shared) == manifest["sha256"]:
            return shared
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass
    return None
