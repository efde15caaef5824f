"""Backends see their site's settings, never the portal's secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import TEST_SECRET_KEY
from labgate.backends.base import load_backend
from labgate.config import Settings, SiteSettings


@pytest.mark.parametrize("name", ["process", "containers"])
def test_a_backend_gets_the_site_settings_without_the_portals_secrets(
    tmp_path: Path, name: str
) -> None:
    settings = Settings(
        data_dir=tmp_path / "var",
        secret_key=TEST_SECRET_KEY,
        admin_password="portal-admin-password-123",
        database_url="postgresql+psycopg://u:dbpass@127.0.0.1/x",
        sandbox="none",
        instance_uid_base=2_000_000_000,
    )
    backend = load_backend(name)(settings, {})
    seen = backend.settings
    assert isinstance(seen, SiteSettings)
    assert seen.workspaces_dir == tmp_path / "var" / "workspaces"
    assert (seen.sandbox, seen.instance_uid_base) == ("none", 2_000_000_000)
    held = repr(vars(backend)) + repr(seen)
    for secret in (TEST_SECRET_KEY, "portal-admin-password-123", "dbpass"):
        assert secret not in held
    for name_ in ("secret_key", "admin_password", "database_url"):
        assert not hasattr(seen, name_)
