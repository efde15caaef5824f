"""The identifier normalizer: examples, then properties checked with hypothesis."""

from __future__ import annotations

import string
import unicodedata
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from labgate.resolver.identifiers import SCHEMES, InvalidIdentifier, normalize

# --- examples ------------------------------------------------------------------------

SAME = [
    (
        "doi:10.5281/zenodo.1234",
        [
            "doi:10.5281/ZENODO.1234",
            "DOI:10.5281/zenodo.1234",
            "https://doi.org/10.5281/zenodo.1234",
            "http://dx.doi.org/10.5281/Zenodo.1234",
            "https://DOI.ORG/10.5281%2Fzenodo.1234",
            "https://doi.org/doi:10.5281/zenodo.1234",
            "info:doi/10.5281/zenodo.1234",
            "urn:doi:10.5281%2Fzenodo.1234",
            "hdl:10.5281/zenodo.1234",
            "https://hdl.handle.net/10.5281/zenodo.1234",
            "  10.5281/zenodo.1234\n",
        ],
    ),
    (
        "hdl:20.500.12345/abc",
        [
            "hdl:20.500.12345/ABC",
            "https://hdl.handle.net/20.500.12345/abc",
            "info:hdl/20.500.12345/Abc",
        ],
    ),
    (
        "ark:12345/x5wd3",
        [
            "ark:/12345/x5wd3",
            "ARK:/12345/x5-wd3",
            "ark:12345/x5wd3/",
            "ark:12345/x5wd3.",
            "https://n2t.net/ark:/12345/x5wd3",
            "https://arks.org/ark:12345/x5wd3",
            "https://library.example.org/ark:/12345/x5wd3",
        ],
    ),
    ("urn:isbn:0451450523", ["URN:ISBN:0451450523", "urn:isbn:0451450523?=lang=en#p1"]),
    ("urn:example:a%2Cb", ["urn:EXAMPLE:a%2cb"]),
    (
        "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
        ["URN:UUID:F81D4FAE-7DEC-11D0-A765-00A0C91E6BF6"],
    ),
    (
        "https://example.org/data/a~b?x=1&y=%2F",
        [
            "HTTPS://Example.ORG:443/data/./a%7Eb?x=1&y=%2f",
            "https://example.org/data/sub/../a~b?x=1&y=%2F#section",
            "https://example.org./data/a%7eb?x=1&y=%2F",
        ],
    ),
    ("http://example.org/", ["http://example.org", "http://EXAMPLE.org:80"]),
    ("http://example.org:8080/x%20y", ["http://example.org:8080/x%20y"]),
    ("https://xn--bcher-kva.example/", ["https://bücher.example/", "https://BÜCHER.example"]),
    ("http://[::1]:8000/data", ["http://[::1]:8000/data"]),
]


@pytest.mark.parametrize(("expected", "spellings"), SAME)
def test_spellings_share_one_canonical_form(expected: str, spellings: list[str]) -> None:
    assert normalize(expected).canonical == expected
    for spelling in spellings:
        assert normalize(spelling).canonical == expected, spelling


INVALID = {
    "": "empty",
    "   ": "empty",
    "hello": "expected doi:",
    "doi:10.12/x": "not a DOI prefix",
    "doi:11.1234/x": "starts with 10.",
    "doi:10.1234": "prefix and a suffix",
    "doi:10.1234/": "suffix",
    "doi:10.1234/a b": "spaces",
    "https://doi.org/": "without a DOI",
    "https://doi.org/10.1234/%FF": "not UTF-8",
    "hdl:abc": "<prefix>/<suffix>",
    "hdl:a b/c": "spaces",
    "ark:/12/x": "NAAN",
    "ark:12345/": "no name",
    "ark:12345/---": "no name",
    "ark:12345/a?info": "inflections",
    "ark:12345/a<b": "ARK name",
    "urn:x:y": "namespace",
    "urn:isbn:": "name part",
    "urn:isbn:a%zz": "name part",
    "urn:uuid:not-a-uuid": "UUID",
    "ftp://example.org/data": "'ftp' is not supported",
    "s3://bucket/key": "'s3' is not supported",
    "http://user:secret@example.org/": "password",
    "http://example.org:99999/": "cannot be parsed",
    "http:///path": "no host",
    "http://exa_mple.org/": "valid host",
    "doi:10.1234/x\u200b": "control",
    "x" * 3000: "longer than",
}


@pytest.mark.parametrize(("text", "reason"), INVALID.items())
def test_invalid_identifiers_say_why(text: str, reason: str) -> None:
    with pytest.raises(InvalidIdentifier) as caught:
        normalize(text)
    assert reason in caught.value.reason


def test_slugs_name_the_mount() -> None:
    assert normalize("doi:10.5281/zenodo.1234").slug == "zenodo.1234"
    assert normalize("https://example.org/files/Iris%20Data.csv").slug == "iris-data"
    assert normalize("urn:isbn:0451450523").slug == "0451450523"
    assert normalize("https://example.org/").slug.startswith("url-")


def test_resolver_urls() -> None:
    assert normalize("doi:10.1000/ABC").resolver_url == "https://doi.org/10.1000/abc"
    assert normalize("ark:/12345/x").resolver_url == "https://n2t.net/ark:12345/x"
    assert normalize("urn:isbn:1").resolver_url is None


# --- properties ------------------------------------------------------------------------

SUFFIX_CHARS = string.ascii_letters + string.digits + "-._;()/:" + "äÅßǰΩЖ\u030a\u212a"
prefixes = st.builds(
    lambda code, sub: "10." + code + sub,
    st.from_regex(r"[0-9]{4,9}", fullmatch=True),
    st.sampled_from(["", ".1", ".22.3"]),
)
suffixes = st.text(SUFFIX_CHARS, min_size=1, max_size=40).filter(lambda s: not s.startswith("/"))
dois = st.builds(lambda p, s: f"{p}/{s}", prefixes, suffixes)


def random_case(draw: st.DrawFn, text: str) -> str:
    """Flip the case of ASCII letters, the ones DOIs fold.

    A letter followed by a combining mark is left alone: with it, it composes
    (NFC) into a non-ASCII character (``a`` + ring is ``å``), whose case is
    significant.
    """
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    out = []
    for i, (c, flip) in enumerate(zip(text, flips, strict=True)):
        combines = i + 1 < len(text) and unicodedata.combining(text[i + 1]) != 0
        out.append(c.upper() if flip and c.isascii() and not combines else c)
    return "".join(out)


@st.composite
def doi_spellings(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(dois)
    form = draw(
        st.sampled_from(
            ["doi:", "DOI:", "https://doi.org/", "http://dx.doi.org/", "bare", "info:doi/", "hdl:"]
        )
    )
    cased = random_case(draw, name)
    if form.startswith("http"):
        return name, form + quote(cased, safe=draw(st.sampled_from(["/", "", "/:;()"])))
    return name, cased if form == "bare" else form + cased


@given(doi_spellings())
@example(("10.1234/J\u030c", "doi:10.1234/J\u030c"))
@example(("10.1234/\u212a", "DOI:10.1234/\u212a"))
@example(("10.0000000/a\u030a", "doi:10.0000000/a\u030a"))
def test_every_doi_spelling_has_the_same_canonical_form(pair: tuple[str, str]) -> None:
    name, spelling = pair
    assert normalize(spelling) == normalize("doi:" + name)
    assert normalize(spelling).canonical.startswith("doi:10.")


@given(dois)
def test_dois_are_case_insensitive_for_ascii_letters(name: str) -> None:
    upper = "".join(c.upper() if c.isascii() else c for c in name)
    assert normalize("doi:" + upper) == normalize("doi:" + name)


def test_only_ascii_letters_are_folded() -> None:
    assert normalize("doi:10.1234/Ä").canonical == "doi:10.1234/Ä"
    assert normalize("doi:10.1234/Ä") != normalize("doi:10.1234/ä")
    # NFC: a decomposed Å is the precomposed one.
    assert normalize("doi:10.1234/A\u030a").canonical == "doi:10.1234/\u00c5"


@st.composite
def arks(draw: st.DrawFn) -> tuple[str, str]:
    naan = draw(st.from_regex(r"[0-9bcdfghjkmnpqrstvwxz]{5,8}", fullmatch=True))
    name = draw(st.from_regex(r"[A-Za-z0-9=~*+@_$]{1,10}(/[A-Za-z0-9]{1,5}){0,2}", fullmatch=True))
    hyphenated = "".join(c + "-" if draw(st.booleans()) else c for c in name)
    form = draw(st.sampled_from(["ark:/", "ark:", "ARK:/", "https://n2t.net/ark:/"]))
    return f"ark:{naan}/{name}", form + naan.upper() + "/" + hyphenated


@given(arks())
def test_ark_spellings_and_hyphens_are_one(pair: tuple[str, str]) -> None:
    plain, spelling = pair
    assert normalize(spelling).canonical == normalize(plain).canonical == plain


@st.composite
def urls(draw: st.DrawFn) -> tuple[str, str]:
    scheme = draw(st.sampled_from(["http", "https"]))
    host = draw(st.from_regex(r"[a-z][a-z0-9]{0,8}(\.[a-z]{2,5}){1,2}", fullmatch=True))
    segments = draw(
        st.lists(
            st.text(string.ascii_letters + string.digits + "-_~", min_size=1, max_size=6),
            max_size=4,
        )
    )
    path = "/" + "/".join(segments)
    query = draw(st.sampled_from(["", "?a=1", "?q=x%2Fy&b"]))
    canonical = f"{scheme}://{host}{path}{query}"
    port = draw(st.sampled_from(["", ":80" if scheme == "http" else ":443"]))
    escaped = "".join(f"%{ord(c):02x}" if c.isalnum() and draw(st.booleans()) else c for c in path)
    fragment = draw(st.sampled_from(["", "#top", "#"]))
    spelling = f"{scheme.upper()}://{host.upper()}{port}{escaped}{query}{fragment}"
    return canonical, spelling


@given(urls())
def test_equivalent_urls_have_one_canonical_form(pair: tuple[str, str]) -> None:
    canonical, spelling = pair
    assert normalize(spelling).canonical == canonical


identifier_like = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda p, t: p + t,
        st.sampled_from(
            [
                "doi:",
                "hdl:",
                "ark:",
                "ark:/",
                "urn:",
                "http://",
                "https://",
                "10.",
                "info:doi/",
                "https://doi.org/",
                "https://hdl.handle.net/",
                "https://n2t.net/ark:/",
                "urn:uuid:",
            ]
        ),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    ),
    st.builds(
        lambda p, t: p + t,
        st.sampled_from(["http://example.org/", "https://x.org:8443/a?"]),
        st.text(string.printable + "äé%", max_size=40),
    ),
)


@settings(max_examples=1000)
@given(identifier_like)
@example("https://example.org/%61rk:/12345/xy")
@example("doi:10.1234/\u212a")
@example("http://example.org/a/..%2F..")
def test_normalizing_is_idempotent_or_refuses_with_a_reason(text: str) -> None:
    try:
        first = normalize(text)
    except InvalidIdentifier as exc:
        assert exc.reason
        return
    assert first.scheme in SCHEMES
    again = normalize(first.canonical)
    assert again == first
    assert first.slug and len(first.slug) <= 63
