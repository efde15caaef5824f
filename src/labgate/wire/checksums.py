"""Checksums written as ``<algorithm>:<hex digest>``, e.g. ``sha256:9f86d0…``, and safe names.

The algorithms are the ones repositories publish: Dataverse and Zenodo give
MD5, many data centres SHA-1, SHA-256 or SHA-512. The portal checks the
checksums of registered datasets; a site checks what it fetched against them
(:mod:`labgate.agent.fetch`); both name files and cache entries with
:func:`slugify`.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import unquote

#: Algorithm name and the length of its hex digest.
ALGORITHMS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_HEX = re.compile(r"^[0-9a-f]+$")
_SLUG_BAD = re.compile(r"[^a-z0-9._-]+")


def slugify(text: str) -> str:
    """Lower-case letters, digits, ``.``, ``_`` and ``-``; at most 63, starting alphanumeric."""
    text = unquote(text).lower()
    text = _SLUG_BAD.sub("-", text).strip("-._")
    return text[:63].rstrip("-._")


def check_checksum(value: str) -> str:
    """``value`` in its one spelling (lower case); ValueError saying what is wrong."""
    algorithm, colon, digest = value.strip().lower().partition(":")
    algorithm = algorithm.replace("-", "")
    if not colon or algorithm not in ALGORITHMS:
        known = ", ".join(ALGORITHMS)
        raise ValueError(f"a checksum is <algorithm>:<hex digest> with one of {known}")
    if len(digest) != ALGORITHMS[algorithm] or not _HEX.match(digest):
        raise ValueError(f"a {algorithm} digest is {ALGORITHMS[algorithm]} hex digits")
    return f"{algorithm}:{digest}"


def hasher(checksum: str) -> hashlib._Hash:
    """A fresh hash object for the algorithm of ``checksum`` (SHA-256 when it is empty)."""
    algorithm = checksum.partition(":")[0] if checksum else "sha256"
    return hashlib.new(algorithm)
