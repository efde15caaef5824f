"""An instance (its tool) as an OAuth client is sent back only under its own prefix."""

from __future__ import annotations

import pytest

from labgate.portal.oauth import Client

PREFIX = "https://labgate.example/i/abc123/"
TOOL = Client("abc123", "secret", instance_prefix=PREFIX)


@pytest.mark.parametrize(
    "uri",
    [
        f"{PREFIX}oauth/callback",
        f"{PREFIX}oauth/callback?next=%2Fnotebooks%2Fa.ipynb",
        f"{PREFIX}a..b/..c/d../callback",
        f"{PREFIX}_labgate/callback",
        PREFIX,
    ],
)
def test_an_instance_client_is_sent_back_under_its_own_prefix(uri: str) -> None:
    assert TOOL.redirects_to(uri)


@pytest.mark.parametrize(
    "tail",
    [
        "../other/callback",
        "%2e%2e/other/callback",
        "%2E%2E/other/callback",
        ".%2e/other/callback",
        "%2e./other/callback",
        "..%2fother/callback",
        "..%2Fother/callback",
        "..\\other/callback",
        "..%5cother/callback",
        "x/..\\..\\other/callback",
        "%252e%252e/other/callback",
        "..;x/other/callback",
        ".\t./other/callback",
        ".%0a./other/callback",
        "..",
        "x/%2e%2e",
    ],
)
def test_an_instance_client_is_never_sent_to_another_instance(tail: str) -> None:
    """However ``..`` is spelled, a code for one instance never goes under another's path."""
    assert not TOOL.redirects_to(PREFIX + tail)
    assert not TOOL.redirects_to("https://labgate.example/i/other/callback")
