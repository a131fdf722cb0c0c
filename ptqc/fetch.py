"""Fetch real models from the manifest (models/manifest.json): download, verify sha256, cache.

The cache is ``$PTQC_CACHE`` or ``~/.cache/ptqc``.  A file is only moved into the cache after its checksum
matches, so a failed or tampered download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from importlib import resources

from ptqc import progress
from ptqc.errors import PtqcError
from ptqc.writer import umask_mode


def load_manifest() -> dict[str, dict]:
    text = resources.files("ptqc.models").joinpath("manifest.json").read_text(encoding="utf-8")
    return {m["name"]: m for m in json.loads(text)["models"]}


def default_cache_dir(override: str | None = None) -> str:
    return override or os.environ.get("PTQC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ptqc")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_stream(src, dst, total: int | None) -> None:
    chunks = iter(lambda: src.read(1 << 20), b"")
    for chunk in progress.steps(chunks, "download", total=None if not total else -(-total // (1 << 20)), unit="MB"):
        dst.write(chunk)


def fetch_model(name: str, source: str | None = None, cache_dir: str | None = None) -> str:
    """Path of the verified, cached model ``name``; downloads it when it is not cached yet."""
    manifest = load_manifest()
    if name not in manifest:
        raise PtqcError(f"unknown model {name!r}; known: {', '.join(manifest)}")
    entry = manifest[name]
    folder = default_cache_dir(cache_dir)
    target = os.path.join(folder, f"{name}.onnx")
    if os.path.exists(target) and sha256_of(target) == entry["sha256"]:
        return target
    url = source or entry.get("url")
    if not url:
        raise PtqcError(f"{name} has no public URL in the manifest; pass --from PATH_OR_URL")
    if "://" not in url:
        if not os.path.exists(url):
            raise PtqcError(f"file not found: {url}")
        url = "file://" + urllib.parse.quote(os.path.abspath(url))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    _copy_stream(resp, out, int(resp.headers.get("Content-Length") or 0))
            except OSError as exc:
                raise PtqcError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from None
        got = sha256_of(tmp)
        if got != entry["sha256"]:
            raise PtqcError(f"checksum mismatch for {name}: expected {entry['sha256']}, got {got}")
        os.chmod(tmp, umask_mode())
        shutil.move(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
