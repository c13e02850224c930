"""Issue 26 on the compose path: `compose.up` with secrets gives the compose sandbox the
placeholders and the broker beside its gateway, as `Sandbox.up` does; the value is
nowhere in the container; a source without a value starts nothing; `compose.down`
removes the broker and the values it held.

Traffic goes only to the HTTPS stand-ins of test_credentials_broker (on the host).
"""

# ruff: noqa: F811 (fixtures imported from test_credentials_broker are parameters here)
from __future__ import annotations

import pytest

from stigmer_sandbox import engine
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.host import compose

from .compose_support import labels_file, unique_name

# The broker tests' fixtures, used by name (pytest finds them imported here).
from .test_credentials_broker import (  # noqa: F401
    OTHER_VALUE,
    VALUE,
    digest,
    environment,
    get,
    host,
    port_of,
    settings_for,
    standins,
    value_anywhere,
)


@pytest.fixture
def compose_settings(tmp_path, host, standins):
    settings = settings_for(tmp_path, host, standins, use_secrets="API_TOKEN,OTHER_TOKEN")
    chosen = compose.FileChoice(extra=(labels_file(tmp_path),))
    current = settings.replace(container_name=unique_name("stigmer-compose-secrets"))
    yield current, chosen
    compose.down(compose.project(current, chosen), current)


def test_a_compose_sandbox_brokers_its_secrets_and_holds_no_value(
    compose_settings, host, standins, environment
):
    settings, chosen = compose_settings
    compose.up(settings, chosen)
    box = compose.attach(settings)
    held = box.exec('printf %s "$API_TOKEN"').stdout
    assert held.startswith("stigmer-secret-") and held != VALUE
    api = f"https://{host}:{port_of(standins['api'])}"
    status, body = get(box, f"{api}/api")
    assert (status, body["authorized"]) == (200, True)
    other = f"https://{host}:{port_of(standins['other'])}"
    status, body = get(box, f"{other}/fine", "X-Token: $OTHER_TOKEN")
    assert (status, body["x-token"]) == (200, digest(OTHER_VALUE))
    assert get(box, f"{other}/leak", "X-Token: $API_TOKEN")[0] == 403
    assert value_anywhere(box, VALUE) == []
    compose.down(compose.project(settings, chosen), settings)
    name = f"{settings.container_name}-egress-broker"
    assert engine.client().containers.list(all=True, filters={"name": name}) == []
    state = settings.path("state_dir")
    assert not any(VALUE.encode() in p.read_bytes() for p in state.rglob("*") if p.is_file())


def test_a_compose_source_without_a_value_starts_nothing(compose_settings, monkeypatch):
    settings, chosen = compose_settings
    monkeypatch.delenv("STIGMER_TEST_API_TOKEN", raising=False)
    monkeypatch.setenv("STIGMER_TEST_OTHER_TOKEN", OTHER_VALUE)
    with pytest.raises(ConfigError) as caught:
        compose.up(settings, chosen)
    assert "secret 'API_TOKEN'" in caught.value.message
    client = engine.client()
    assert client.containers.list(all=True, filters={"name": settings.container_name}) == []
    assert client.networks.list(names=[f"{settings.container_name}-egress"]) == []
