"""The broker addon's decisions (dockerfiles/broker/stigmer_broker.py), without mitmproxy:
where placeholders are found, which destinations a secret may go to, what is replaced."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import pytest

from stigmer_sandbox import egress
from stigmer_sandbox.credentials import new_placeholder
from stigmer_sandbox.runtime import broker as host_broker

ADDON = Path(__file__).resolve().parents[2] / "dockerfiles" / "broker" / "stigmer_broker.py"
spec = importlib.util.spec_from_file_location("stigmer_broker", ADDON)
addon = importlib.util.module_from_spec(spec)
spec.loader.exec_module(addon)  # type: ignore[union-attr]

API = new_placeholder()
GIT = new_placeholder()


def table(tmp_path: Path) -> dict:
    document = {
        "secrets": [
            {
                "name": "API_TOKEN",
                "placeholder": API,
                "value": "api-value",
                "destinations": [
                    host_broker._destination(egress.parse_entry(e))
                    for e in ("api.example.com", "*.corp.example:8443", "10.1.0.0/16")
                ],
                "header": "Authorization: Bearer {value}",
            },
            {
                "name": "GIT_TOKEN",
                "placeholder": GIT,
                "value": "git-value",
                "destinations": [host_broker._destination(egress.parse_entry("git.example.com"))],
            },
        ]
    }
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps(document))
    return addon.Table(str(path)).current()


@pytest.mark.parametrize(
    ("host", "port", "goes"),
    [
        ("api.example.com", 443, True),
        ("API.example.com.", 8080, True),
        ("evil-api.example.com", 443, False),
        ("x.corp.example", 8443, True),
        ("corp.example", 8443, False),  # a wildcard covers names under it, not itself
        ("x.corp.example", 443, False),
        ("10.1.200.3", 443, True),
        ("10.2.0.1", 443, False),
    ],
)
def test_destinations_match_as_egress_entries_do(tmp_path, host, port, goes):
    assert table(tmp_path)[API].goes_to(host, port) is goes


def test_placeholders_are_found_in_the_url_headers_basic_credentials_and_body():
    basic = "Basic " + base64.b64encode(f"x-access-token:{GIT}".encode()).decode()
    found = addon.placeholders_in(
        f"/a?t={API}",
        [("X-Token", f"pre-{API}-post"), ("Authorization", basic)],
        f"data={GIT}".encode(),
    )
    assert found == [
        (API, "url"),
        (API, "header:X-Token"),
        (GIT, "basic:Authorization"),
        (GIT, "body"),
    ]
    assert addon.placeholders_in(f"/{API}x", [], None) == []  # not one: longer
    assert addon.placeholders_in("/stigmer-secret-123", [], None) == []


def test_a_placeholder_may_go_only_to_its_destinations(tmp_path):
    secrets = table(tmp_path)
    assert addon.refusal(secrets, "api.example.com", 443, [(API, "url")]) is None
    assert addon.refusal(secrets, "git.example.com", 443, [(API, "header:X")]) == (
        "API_TOKEN",
        "header:X",
    )
    stranger = new_placeholder()  # another sandbox's, or a revoked one
    assert addon.refusal(secrets, "api.example.com", 443, [(stranger, "url")]) == (
        "unknown",
        "url",
    )


def test_values_replace_placeholders_inside_basic_credentials(tmp_path):
    here = [table(tmp_path)[GIT]]
    basic = "Basic " + base64.b64encode(f"x-access-token:{GIT}".encode()).decode()
    replaced = addon.header_value(basic, here)
    assert base64.b64decode(replaced.split(" ", 1)[1]) == b"x-access-token:git-value"
    assert addon.header_value(f"token {GIT}", here) == "token git-value"


def test_a_missing_or_broken_file_means_no_secrets(tmp_path):
    assert addon.Table(str(tmp_path / "absent.json")).current() == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert addon.Table(str(tmp_path / "bad.json")).current() == {}


def test_a_rewritten_file_is_read_again(tmp_path):
    secrets = table(tmp_path)
    loaded = addon.Table(str(tmp_path / "secrets.json"))
    assert set(loaded.current()) == set(secrets)
    (tmp_path / "secrets.json").write_text(json.dumps({"secrets": []}))
    assert loaded.current() == {}


def test_broker_log_lines_become_egress_records():
    lines = [
        json.dumps(
            {"event": "refused", "destination": "h.example:443", "secret": "A", "where": "url"}
        ),
        json.dumps({"event": "brokered", "destination": "10.0.0.1:8443", "secrets": ["A", "B"]}),
        "not json",
        json.dumps({"event": "secrets-unreadable"}),
    ]
    records = host_broker.records(lines)
    assert [(r["decision"], r["rule"], r["name"], r["port"]) for r in records] == [
        ("refused", "secret-placeholder:A:url", "h.example", 443),
        ("allowed", "secrets:A,B", "10.0.0.1", 8443),
    ]


class FakeHeaders:
    """The part of mitmproxy's `Headers` the addon uses (case-insensitive, multi-valued)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = list(pairs)

    def get(self, name: str, default: str = "") -> str:
        found = self.get_all(name)
        return found[0] if found else default

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k.lower() == name.lower()]

    def set_all(self, name: str, values: list[str]) -> None:
        self.pairs = [(k, v) for k, v in self.pairs if k.lower() != name.lower()]
        self.pairs += [(name, v) for v in values]

    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for k, _ in self.pairs))

    def items(self, multi: bool = False) -> list[tuple[str, str]]:
        return list(self.pairs)

    def __setitem__(self, name: str, value: str) -> None:
        self.set_all(name, [value])


class FakeFlow:
    def __init__(self, host: str, headers: list[tuple[str, str]], stream: bool) -> None:
        self.request = type(
            "Request",
            (),
            {"host": host, "port": 443, "path": "/upload", "host_header": host,
             "headers": FakeHeaders(headers), "stream": stream},
        )()  # fmt: skip
        self.metadata: dict = {}
        self.response = None
        self.client_conn = type("Client", (), {"peername": ("10.231.0.3", 40000)})()


def test_a_streamed_request_is_brokered_from_its_headers_alone(tmp_path):
    """A body that streams (over `stream_large_bodies`, or an S3 upload) leaves before the
    `request` hook runs: its headers are substituted in `requestheaders`."""
    broker = addon.Broker()
    broker.table = type("Fixed", (), {"current": staticmethod(lambda: table(tmp_path))})()
    flow = FakeFlow("git.example.com", [("X-Token", GIT)], stream=True)
    broker.requestheaders(flow)
    assert flow.request.headers.get("X-Token") == "git-value"
    assert flow.metadata.get(addon.DONE) is True and flow.response is None


def test_the_proxy_listens_only_once_the_addon_runs(tmp_path, monkeypatch):
    """The broker starts with `server=false` (mitmproxy loads scripts in a task of their
    own: a proxy listening before its addon passes placeholders on unjudged); the addon
    starts the server when it runs, and writes its ready file once the server listens."""
    import asyncio
    import inspect
    import os
    import sys
    import types

    assert "--set server=false" in inspect.getsource(host_broker.Broker._create)

    class Server:
        def __init__(self) -> None:
            self.addresses: list = []

        def listen_addrs(self) -> list:
            return self.addresses

    server = Server()
    updates: list[dict] = []

    def update(**changes: object) -> None:
        updates.append(changes)
        asyncio.get_running_loop().call_later(0.02, server.addresses.append, ("127.0.0.1", 1))

    addons = types.SimpleNamespace(get=lambda name: server if name == "proxyserver" else None)
    ctx = types.SimpleNamespace(
        options=types.SimpleNamespace(update=update),
        master=types.SimpleNamespace(addons=addons),
    )
    monkeypatch.setitem(sys.modules, "mitmproxy", types.SimpleNamespace(ctx=ctx))
    ready = tmp_path / "broker-ready"
    monkeypatch.setattr(addon, "READY_FILE", str(ready))

    async def run() -> bool:
        addon.Broker().running()
        seen_before_listening = ready.exists()
        for _ in range(200):
            if ready.exists():
                break
            await asyncio.sleep(0.005)
        return seen_before_listening

    assert asyncio.run(run()) is False
    assert updates == [{"server": True}]
    assert ready.read_text() == str(os.getpid())
