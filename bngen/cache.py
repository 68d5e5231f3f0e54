"""The on-disk store of compiled kernels: a thin wrapper around `Compiler.compile`.

Layout: ``<root>/<key[:2]>/<key>/`` holding the generated C, the shared object, the
spec as JSON and a manifest written last (size and SHA-256 of the shared object).  An
entry is published whole with one ``os.replace`` of a directory built beside it, under a
per-key file lock, so concurrent builders compile once and nobody loads a partial file.
An entry whose shared object does not match its manifest is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Union

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


class Cache:
    """Compiled kernels under one root directory."""

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lookup(self, key: str) -> Optional[Path]:
        """The shared object of a complete, intact entry, or None."""
        return _verified(self.entry(key))

    def fetch(self, key: str, compile: Callable[[Path], Path], files: Mapping[str, str]) -> Path:
        """The shared object for `key`, compiling it with `compile(directory)` on a miss.

        `files` (name -> text) are stored beside it for people reading the cache.
        Falls back to a temporary directory, with a `CacheWarning`, if the root is not
        writable.
        """
        found = self.lookup(key)
        if found is not None:
            return found
        try:
            return self._publish(self.root, key, compile, files)
        except OSError as exc:  # unwritable, read-only file system, a file in the way...
            fallback = _FALLBACKS.get(self.root)
            if fallback is None:
                fallback = _FALLBACKS[self.root] = Path(tempfile.mkdtemp(prefix="bngen-cache-"))
                warnings.warn(
                    f"bngen cache directory {self.root} is not usable ({exc.strerror or exc}); "
                    f"using {fallback} for this process. Set {ENV_VAR} or pass cache_dir= to choose another.",
                    CacheWarning,
                    stacklevel=4,
                )
            return self._publish(fallback, key, compile, files)

    @staticmethod
    def _publish(root: Path, key: str, compile: Callable[[Path], Path], files: Mapping[str, str]) -> Path:
        shard = root / key[:2]
        shard.mkdir(parents=True, exist_ok=True)
        target = shard / key
        with filelock.FileLock(str(shard / f"{key}.lock")):
            found = _verified(target)
            if found is not None:  # another process built it while we waited
                return found
            if target.exists():  # damaged or partial: rebuild from scratch
                shutil.rmtree(target, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=shard))
            try:
                for name, text in files.items():
                    (work / name).write_text(text)
                shared = compile(work)
                manifest = {"object": shared.name, "size": shared.stat().st_size, "sha256": _file_digest(shared)}
                (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
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

    def clear(self) -> int:
        """Removes every entry; returns how many there were."""
        count = len(self.entries())
        if self.root.is_dir():
            for shard in self.root.iterdir():
                if shard.is_dir() and len(shard.name) == 2:
                    shutil.rmtree(shard, ignore_errors=True)
                elif shard.is_file() and shard.name.startswith("compiler-"):
                    shard.unlink(missing_ok=True)
        return count


def _verified(entry: Path) -> Optional[Path]:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        shared = entry / manifest["object"]
        if shared.stat().st_size == manifest["size"] and _file_digest(shared) == manifest["sha256"]:
            return shared
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None
