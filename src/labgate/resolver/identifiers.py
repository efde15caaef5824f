"""Dataset identifiers: every accepted spelling turned into one canonical form.

============  =====================================  ==============================
scheme        accepted spellings                     canonical form
============  =====================================  ==============================
DOI           ``doi:10.1234/X``, ``DOI:…``,          ``doi:10.1234/x``
              ``https://doi.org/10.1234/X``,
              ``http://dx.doi.org/…``, ``info:doi/…``,
              ``urn:doi:…``, a bare ``10.1234/X``,
              ``hdl:10.1234/X`` (a DOI is a Handle)
Handle        ``hdl:20.500.1/X``, ``info:hdl/…``,     ``hdl:20.500.1/x``
              ``https://hdl.handle.net/20.500.1/X``
ARK           ``ark:/12345/x-y``, ``ark:12345/xy``,   ``ark:12345/xy``
              ``https://n2t.net/ark:/12345/xy``,
              any ``https://host/ark:/12345/xy``
URN           ``URN:ISBN:0451450523``                ``urn:isbn:0451450523``
URL           ``HTTPS://Example.org:443/a/./b%7e?q#f`` ``https://example.org/a/b~?q``
============  =====================================  ==============================

The rules, and why:

- DOIs and Handles are case-insensitive for ASCII letters only (DOI
  Handbook 2.4; Handle defaults), so those are lowered and nothing else is;
  the result is Unicode NFC. Lowering can make a string composable (``J`` +
  combining caron has no precomposed form, ``ǰ`` has) and NFC can produce an
  ASCII capital (the Kelvin sign), hence NFC, lower, NFC: that is stable.
- In URL spellings the path is percent-decoded: ``%2F`` in a DOI URL is a
  slash of the DOI. In ``doi:`` spellings nothing is decoded.
- ARKs follow the ARK specification's normalization: the ``ark:`` label and
  the NAAN are lowered, the slash after ``ark:`` is dropped (the modern form),
  hyphens are identity-inert and removed, a trailing ``/`` or ``.`` goes.
- URNs follow RFC 8141 equivalence: ``urn`` and the NID are lowered, the hex
  digits of percent-escapes upper-cased, r-, q- and f-components dropped;
  ``urn:uuid:`` is lowered whole (RFC 9562).
- URLs follow RFC 3986 section 6 normalization: scheme and host lowered
  (IDNA for non-ASCII hosts), default port and fragment dropped, escapes of
  unreserved characters decoded and other escapes upper-cased, dot segments
  removed, an empty path is ``/``. Only ``http`` and ``https``; URLs with
  credentials are refused rather than stored.

Everything else raises :class:`InvalidIdentifier`, whose ``reason`` says why
in words a person can act on.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from labgate.wire.checksums import slugify

MAX_LENGTH = 2048
SCHEMES = ("doi", "hdl", "ark", "urn", "url")

DOI_HOSTS = frozenset({"doi.org", "dx.doi.org", "www.doi.org"})
HANDLE_HOSTS = frozenset({"hdl.handle.net"})
ARK_HOSTS = frozenset({"n2t.net", "arks.org"})

_DOI_RE = re.compile(r"^10\.[0-9]{4,9}(?:\.[0-9]+)*/.+$", re.DOTALL)
_HANDLE_RE = re.compile(r"^[0-9A-Za-z]+(?:\.[0-9A-Za-z]+)*/.+$", re.DOTALL)
# Betanumeric: digits and consonants except l (ARK specification).
_NAAN_RE = re.compile(r"^[0-9bcdfghjkmnpqrstvwxz]{5,16}$")
_ARK_NAME_RE = re.compile(r"^(?:[A-Za-z0-9=~*+@_$./]|%[0-9A-F]{2})+$")
_NID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,30}[A-Za-z0-9]$")
_NSS_RE = re.compile(
    r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-F]{2})(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-F]{2})*$"
)
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_HOST_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*$")

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SUB_DELIMS = frozenset("!$&'()*+,;=")
_PATH_SAFE = _UNRESERVED | _SUB_DELIMS | frozenset(":@/")
_QUERY_SAFE = _PATH_SAFE | frozenset("?")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class InvalidIdentifier(ValueError):
    """The text is not an identifier labgate accepts; ``reason`` says why."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"{text[:200]!r} is not a valid identifier: {reason}")
        self.text = text
        self.reason = reason


@dataclass(frozen=True)
class Identifier:
    """A normalized identifier: its scheme and its one canonical form."""

    scheme: str
    canonical: str

    def __str__(self) -> str:
        return self.canonical

    @property
    def value(self) -> str:
        """The canonical form without its scheme label (the URL itself for URLs)."""
        if self.scheme == "url":
            return self.canonical
        return self.canonical.split(":", 1)[1]

    @property
    def resolver_url(self) -> str | None:
        """Where a browser can look the identifier up, if there is such a place."""
        if self.scheme == "doi":
            return "https://doi.org/" + quote(self.value, safe="/:;()._-")
        if self.scheme == "hdl":
            return "https://hdl.handle.net/" + quote(self.value, safe="/:;()._-")
        if self.scheme == "ark":
            return "https://n2t.net/" + self.canonical
        if self.scheme == "url":
            return self.canonical
        return None

    @property
    def slug(self) -> str:
        """A short name for mounting (``/data/<slug>``): the last part of the identifier."""
        value = self.value
        if self.scheme == "url":
            value = urlsplit(value).path
        elif self.scheme == "urn":
            value = value.replace(":", "/")
        parts = [p for p in value.split("/") if p]
        last = parts[-1] if parts else ""
        if self.scheme == "url" and "." in last.strip("."):
            last = last.rsplit(".", 1)[0]  # iris.csv -> iris
        return slugify(last) or f"{self.scheme}-{short_hash(self.canonical)}"


def short_hash(text: str) -> str:
    """Eight hex digits of SHA-256: enough to tell names apart, short enough to read."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def normalize(text: str) -> Identifier:
    """The canonical identifier for ``text``; :class:`InvalidIdentifier` when it is none."""
    if not isinstance(text, str):
        raise InvalidIdentifier(repr(text), "identifiers are text")
    stripped = text.strip()
    if not stripped:
        raise InvalidIdentifier(text, "it is empty")
    if len(stripped) > MAX_LENGTH:
        raise InvalidIdentifier(text, f"it is longer than {MAX_LENGTH} characters")
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in stripped):
        raise InvalidIdentifier(text, "it contains spaces or control characters")

    lowered = stripped[:10].translate(_ASCII_LOWER)  # ASCII only: the labels are ASCII
    for label, parse in _PREFIXES:
        if lowered.startswith(label):
            return parse(text, stripped[len(label) :])
    if lowered.startswith(("http://", "https://")):
        return _from_url(text, stripped)
    if stripped.startswith("10."):
        return _doi(text, stripped)
    match = _SCHEME_RE.match(stripped)
    if match:
        raise InvalidIdentifier(
            text,
            f"the scheme {match.group(1).lower()!r} is not supported; use a DOI, Handle, "
            "ARK, URN or an http(s) URL",
        )
    raise InvalidIdentifier(
        text, "expected doi:…, hdl:…, ark:…, urn:…, a DOI (10.…) or an http(s) URL"
    )


def canonical(text: str) -> str:
    """Shorthand: the canonical form of ``text``."""
    return normalize(text).canonical


# --- DOI and Handle ---------------------------------------------------------------


def _fold(text: str) -> str:
    """ASCII letters lowered, Unicode NFC, stable under repetition (see the module doc)."""
    text = unicodedata.normalize("NFC", text)
    return unicodedata.normalize("NFC", text.translate(_ASCII_LOWER))


def _doi(text: str, name: str) -> Identifier:
    if not name.startswith("10."):
        raise InvalidIdentifier(text, "a DOI starts with 10. (e.g. doi:10.5281/zenodo.1234)")
    if "/" not in name:
        raise InvalidIdentifier(text, "a DOI has a prefix and a suffix separated by /")
    if not _DOI_RE.match(name):
        prefix = name.split("/", 1)[0]
        if not name.split("/", 1)[1]:
            raise InvalidIdentifier(text, "the DOI suffix (after the /) is empty")
        raise InvalidIdentifier(
            text, f"{prefix!r} is not a DOI prefix (10. then a registrant code of 4-9 digits)"
        )
    return Identifier("doi", "doi:" + _fold(name))


def _handle(text: str, name: str) -> Identifier:
    if name.startswith("10."):
        return _doi(text, name)  # every DOI is a Handle; keep one name for it
    if not _HANDLE_RE.match(name):
        if "/" not in name or not name.split("/", 1)[1]:
            raise InvalidIdentifier(text, "a Handle is <prefix>/<suffix>, both non-empty")
        raise InvalidIdentifier(
            text, "a Handle prefix is made of letters and digits separated by dots"
        )
    return Identifier("hdl", "hdl:" + _fold(name))


# --- ARK --------------------------------------------------------------------------


def _ark(text: str, body: str) -> Identifier:
    body = body.lstrip("/")  # ark:/12345/x (classic) and ark:12345/x (modern) are one
    naan, slash, name = body.partition("/")
    naan = naan.lower()
    if not slash or not _NAAN_RE.match(naan):
        raise InvalidIdentifier(
            text, "an ARK is ark:NAAN/name with a NAAN of 5+ digits or consonants"
        )
    if "?" in name or "#" in name:
        raise InvalidIdentifier(text, "an ARK name cannot contain ? or # (inflections)")
    name = _upper_escapes(name).replace("-", "").rstrip("/.")
    if not name:
        raise InvalidIdentifier(text, "the ARK has no name after its NAAN")
    if not _ARK_NAME_RE.match(name):
        raise InvalidIdentifier(
            text, "an ARK name is letters, digits and = ~ * + @ _ $ . / (or %-escapes)"
        )
    return Identifier("ark", f"ark:{naan}/{name}")


# --- URN --------------------------------------------------------------------------


def _urn(text: str, body: str) -> Identifier:
    nid, colon, nss = body.partition(":")
    if not colon or not _NID_RE.match(nid):
        raise InvalidIdentifier(
            text, "a URN is urn:<namespace>:<name>, the namespace 2-32 letters, digits or -"
        )
    nid = nid.lower()
    # r-, q- and f-components (?+ ?= #) are not part of URN equivalence (RFC 8141 3.1).
    nss = re.split(r"[?#]", nss, maxsplit=1)[0]
    if nid == "doi":
        return _doi(text, _decode(text, nss))
    if nid == "hdl":
        return _handle(text, _decode(text, nss))
    nss = _upper_escapes(nss)
    if not nss or not _NSS_RE.match(nss):
        raise InvalidIdentifier(
            text, "the URN's name part is empty or has characters a URN does not allow"
        )
    if nid == "uuid":
        nss = nss.lower()
        if not _UUID_RE.match(nss):
            raise InvalidIdentifier(text, "urn:uuid: needs a UUID (8-4-4-4-12 hex digits)")
    return Identifier("urn", f"urn:{nid}:{nss}")


# --- URLs -------------------------------------------------------------------------


def _from_url(text: str, url: str) -> Identifier:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidIdentifier(text, f"the URL cannot be parsed ({exc})") from None
    scheme = parts.scheme.lower()
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidIdentifier(text, "URLs with a user name or password are not accepted")
    host = _host(text, parts.hostname or "")
    path = parts.path

    if host in DOI_HOSTS or host in HANDLE_HOSTS:
        name = _decode(text, path.lstrip("/"))
        if host in DOI_HOSTS:
            name = name[4:] if name.lower().startswith("doi:") else name
            if not name.startswith("10."):
                raise InvalidIdentifier(text, f"{host} URL without a DOI (10.…) in its path")
            return _doi(text, name)
        return _handle(text, name)
    # Escapes first: /%61rk:/… is /ark:/… too, and must not come back as an ARK later.
    path = _remove_dot_segments(_normalize_escapes(path, _PATH_SAFE)) or "/"
    if path[:5].translate(_ASCII_LOWER) == "/ark:":
        return _ark(text, path[len("/ark:") :])
    if host in ARK_HOSTS:
        raise InvalidIdentifier(text, f"{host} URL without an ARK (ark:…) in its path")

    default = 80 if scheme == "http" else 443
    netloc = host if port in (None, default) else f"{host}:{port}"
    query = _normalize_escapes(parts.query, _QUERY_SAFE)
    result = f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")
    if len(result) > MAX_LENGTH:
        raise InvalidIdentifier(text, f"the normalized URL is longer than {MAX_LENGTH} characters")
    return Identifier("url", result)


def _host(text: str, host: str) -> str:
    host = host.rstrip(".")
    if not host:
        raise InvalidIdentifier(text, "the URL has no host")
    if ":" in host:  # an IPv6 literal; urlsplit has checked its brackets
        return f"[{host}]"
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidIdentifier(text, f"{host!r} is not a valid host name") from None
    if not _HOST_RE.match(host):
        raise InvalidIdentifier(text, f"{host!r} is not a valid host name")
    return host


def _decode(text: str, value: str) -> str:
    """Percent-decode UTF-8; undecodable escapes are an error, not a replacement char."""
    try:
        decoded = unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise InvalidIdentifier(text, "it has %-escapes that are not UTF-8") from None
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in decoded):
        raise InvalidIdentifier(text, "it contains escaped spaces or control characters")
    return decoded


def _upper_escapes(value: str) -> str:
    return re.sub(r"%([0-9a-fA-F]{2})", lambda m: "%" + m.group(1).upper(), value)


def _normalize_escapes(value: str, safe: frozenset[str]) -> str:
    """RFC 3986 6.2.2: decode escaped unreserved characters, escape the rest, upper hex."""
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "%" and re.fullmatch(r"[0-9A-Fa-f]{2}", value[i + 1 : i + 3]):
            byte = int(value[i + 1 : i + 3], 16)
            decoded = chr(byte)
            out.append(decoded if decoded in _UNRESERVED else f"%{byte:02X}")
            i += 3
            continue
        if ch in safe:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4."""
    output: list[str] = []
    for segment in path.split("/")[1:] if path.startswith("/") else path.split("/"):
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    if path.split("/")[-1] in (".", ".."):
        output.append("")
    return "/" + "/".join(output) if path.startswith("/") else "/".join(output)


_PREFIXES = (
    ("doi:", _doi),
    ("info:doi/", _doi),
    ("hdl:", _handle),
    ("info:hdl/", _handle),
    ("ark:", _ark),
    ("urn:", _urn),
)
