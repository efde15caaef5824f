"""``labgate dataset`` and ``labgate launch --dataset`` against a real portal."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from labgate.cli import app
from labgate.cli.datasets import PART_BYTES, parts
from labgate.config import SiteConfig
from live_server import LiveServer, live_server

DOI = "doi:10.5281/zenodo.1234"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data root of site ``local``."""
    root = tmp_path_factory.mktemp("cli-datasets-data") / "local-data"
    (root / "zenodo" / "1234").mkdir(parents=True)
    (root / "zenodo" / "1234" / "iris.csv").write_text("a,b\n")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("cli-datasets")
    with live_server(tmp, sites=[SiteConfig(name="local", data_root=data_root)]) as running:
        yield running


@pytest.fixture(scope="module")
def token(server: LiveServer) -> str:
    return server.admin_token()


@pytest.fixture
def cli(server: LiveServer, token: str, tmp_path: Path) -> Any:
    runner = CliRunner()

    def run(*args: str, ok: bool = True, input: str | None = None) -> Any:
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LABGATE_")}
        env.update(
            {
                "LABGATE_URL": server.url,
                "LABGATE_TOKEN": token,
                "XDG_CONFIG_HOME": str(tmp_path / "config"),
                "COLUMNS": "250",
            }
        )
        result = runner.invoke(app, list(args), env=env, input=input)
        assert "Traceback" not in result.output, result.output
        assert (result.exit_code == 0) == ok, (result.stdout, result.stderr)
        return result

    return run


def test_register_show_list_update_delete(cli: Any) -> None:
    out = cli(
        "dataset",
        "register",
        "https://doi.org/10.5281/ZENODO.1234",
        "--title",
        "Iris",
        "--size",
        "2048",
        "--replica",
        "local:zenodo/1234",
    )
    assert out.stdout.strip() == DOI
    assert "mounted as /data/zenodo.1234" in out.stderr

    table = cli("dataset", "show", "10.5281/zenodo.1234").stdout
    assert "Iris" in table and "zenodo/1234" in table and "yes" in table
    shown = json.loads(cli("dataset", "show", DOI, "--json").stdout)
    assert shown["replicas"][0]["live"] is True

    listed = cli("dataset", "list", "--search", "iris").stdout
    assert DOI in listed and "local" in listed
    assert json.loads(cli("dataset", "list", "--scheme", "hdl", "--json").stdout) == []

    updated = json.loads(cli("dataset", "update", DOI, "--license", "CC0-1.0", "--json").stdout)
    assert updated["license"] == "CC0-1.0"
    assert "nothing to change" in cli("dataset", "update", DOI, ok=False).stderr

    invalid = cli("dataset", "register", "doi:10.1/x", ok=False)
    assert "not a DOI prefix" in invalid.stderr and "(invalid_identifier)" in invalid.stderr

    cli("dataset", "replica", "remove", DOI, "local")
    added = cli("dataset", "replica", "add", DOI, "local", "zenodo/1234", "--size", "4")
    assert "(live)" in added.stdout

    resolved = cli("dataset", "resolve", "https://doi.org/10.5281/zenodo.1234").stdout
    assert "demo" in resolved and "/launch?dataset=doi:10.5281/zenodo.1234&tool=demo" in resolved
    badge = cli("dataset", "badge", DOI, "--tool", "demo").stdout.strip()
    assert badge.startswith("[![Launch in labgate](") and "/badge.svg)](" in badge
    html = cli("dataset", "badge", DOI, "--tool", "demo", "--html").stdout
    assert "&amp;tool=demo" in html
    opening = cli("dataset", "badge", DOI, "--tool", "demo", "--urlpath", "lab/tree/{dataset}")
    assert "&tool=demo&urlpath=lab/tree/{dataset})" in opening.stdout
    refused = cli("dataset", "badge", DOI, "--tool", "demo", "--urlpath", "../x", ok=False)
    assert "--urlpath" in refused.stderr + refused.stdout

    cli("dataset", "delete", "doi:10.9999/absent", "--yes", ok=False)
    assert "deleted" in cli("dataset", "delete", DOI, "--yes").stdout


def test_launch_next_to_a_dataset(cli: Any) -> None:
    cli("dataset", "register", "doi:10.1234/launch", "--replica", "local:zenodo/1234")
    launched = json.loads(cli("launch", "demo", "--dataset", "doi:10.1234/launch", "--json").stdout)
    assert launched["state"] == "running"
    assert launched["dataset"] == "doi:10.1234/launch"
    assert launched["mounts"][0]["target"] == "/data/launch"
    cli("stop", launched["id"], "--wait")


def test_push_sends_large_inventories_in_parts(cli: Any, tmp_path: Path, data_root: Path) -> None:
    for path in [*(f"bulk/{n}" for n in range(12000)), "bulk/1-moved", "csv"]:
        (data_root / path).mkdir(parents=True, exist_ok=True)
    inventory = tmp_path / "inventory.jsonl"
    with inventory.open("w") as handle:
        for n in range(12000):
            entry = {"id": f"doi:10.1234/bulk.{n}", "path": f"bulk/{n}", "size": n}
            handle.write(json.dumps(entry) + "\n")
        handle.write(json.dumps({"id": "not an identifier", "path": "x"}) + "\n")
    result = json.loads(cli("dataset", "push", "local", str(inventory), "--json").stdout)
    assert result["parts"] >= 2
    assert (result["received"], result["added"], result["rejected_count"]) == (12001, 12000, 1)
    assert result["replicas"] >= 12000 and result["final"] is True

    csv_file = tmp_path / "more.csv"
    csv_file.write_text("id,path,size\ndoi:10.1234/bulk.1,bulk/1-moved,1\ndoi:10.1234/csv,csv,\n")
    summary = cli("dataset", "push", "local", str(csv_file), "--merge", "--ttl", "3600").stdout
    assert "1 added, 1 updated" in summary and "0 removed" in summary

    # A full (replace) push of two entries removes the rest of the site's inventory.
    replaced = cli(
        "dataset",
        "push",
        "local",
        "-",
        "--format",
        "jsonl",
        input='{"id": "doi:10.1234/csv", "path": "csv"}\n',
    ).stdout
    assert "removed" in replaced and "the site now holds 1" in replaced


def test_parts_stay_under_the_request_limit() -> None:
    entries = ({"id": f"doi:10.1234/{'x' * 200}.{n}", "path": "p"} for n in range(10000))
    chunks = list(parts(entries, 5000))
    assert sum(len(c) for c in chunks) == 10000
    assert all(len(json.dumps({"replicas": c})) < PART_BYTES + 1024 for c in chunks)
    assert list(parts(iter([]), 10)) == [[]]


def test_admins_grant_and_revoke_the_data_provider_role(cli: Any) -> None:
    cli("user", "add", "carol")
    granted = cli("user", "data-provider", "carol").stdout
    assert granted.strip() == "user 'carol' may now register datasets"
    users = {u["name"]: u for u in json.loads(cli("user", "list", "--json").stdout)}
    assert users["carol"]["data_provider"] is True and users["admin"]["data_provider"] is False
    assert "DATA PROVIDER" in cli("user", "list").stdout
    revoked = cli("user", "data-provider", "carol", "--revoke").stdout
    assert revoked.strip() == "user 'carol' may no longer register datasets"
    users = {u["name"]: u for u in json.loads(cli("user", "list", "--json").stdout)}
    assert users["carol"]["data_provider"] is False
    missing = cli("user", "data-provider", "nobody", ok=False)
    assert "nobody" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
