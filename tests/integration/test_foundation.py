"""Issue 2 on a real engine: doctor, friendly engine errors, the engine lookups, the
offline base image."""

from __future__ import annotations

import json
import uuid

import pytest

from stigmer_sandbox import config, engine, labels
from stigmer_sandbox.errors import SandboxNotReady
from stigmer_sandbox.images import smoke

from ..conftest import ROOT
from .conftest import TEST_LABELS, run_in

MISSING_SOCKET = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
FAST_CHECK = {**smoke.FAST_HEALTHCHECK, "retries": 1}
FAILING_CHECK = {**FAST_CHECK, "test": ["CMD-SHELL", "echo failing on purpose; exit 1"]}


def test_doctor_passes_with_the_engine_up(inv):
    done = inv("doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "✓ docker engine" in done.stdout
    report = json.loads(inv("doctor", "--json").stdout)
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"]} >= {
        "docker engine",
        "compose",
        "disk",
        "workspace",
        "extra CA",
        "base image",
    }


def test_doctor_with_missing_socket_fails_with_one_clear_line(inv):
    done = inv("doctor", env=MISSING_SOCKET)
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    failing = [line for line in done.stdout.splitlines() if line.startswith("✗")]
    assert len(failing) == 1
    assert "nothing answers at unix:///nonexistent/docker.sock" in failing[0]


def test_engine_task_with_missing_socket_prints_one_line(inv):
    done = inv("sandbox.bootstrap-base", env=MISSING_SOCKET)
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "not running" in done.stderr and "inv engine.start" in done.stderr


def test_bootstrap_base_makes_a_small_labelled_debian_and_reruns_as_noop(inv, docker_engine):
    base = config.load_settings(ROOT).base_image
    first = inv("sandbox.bootstrap-base")
    assert first.returncode == 0, first.stderr
    image = docker_engine.images.get(base)
    assert image.labels[labels.MANAGED] == "true"
    assert image.labels[labels.KIND] == "base"
    assert image.attrs["Size"] <= 80 * 1000**2, image.attrs["Size"]
    assert run_in(docker_engine, base, ["cat", "/etc/debian_version"]).startswith("12.")
    slimmed = "find /usr/share/man /usr/share/info /var/lib/apt/lists -type f | wc -l"
    assert run_in(docker_engine, base, ["sh", "-c", slimmed]).strip() == "0"
    second = inv("sandbox.bootstrap-base")
    assert second.returncode == 0
    assert "up to date" in second.stdout
    assert docker_engine.images.get(base).id == image.id


def test_lookups_on_the_real_engine(basic_image):
    content_tag = next(tag for tag in basic_image.tags if ":sha-" in tag)
    missing = f"stigmer-sandbox-missing:{uuid.uuid4().hex[:8]}"
    assert engine.image_id(content_tag) == basic_image.id
    assert engine.image(basic_image.id).id == basic_image.id
    assert engine.image_id(missing) is None
    with pytest.raises(SandboxNotReady, match=f"image not found: {missing}"):
        engine.image(missing)
    assert engine.find_container(f"stigmer-sandbox-missing-{uuid.uuid4().hex[:8]}") is None


def start(client, image, command: list[str], **options):
    return client.containers.run(image.id, command, detach=True, labels=TEST_LABELS, **options)


def test_wait_healthy_on_the_real_engine(docker_engine, basic_image, base_image):
    healthy = start(docker_engine, basic_image, smoke.KEEPALIVE, healthcheck=FAST_CHECK)
    assert engine.find_container(healthy.name).id == healthy.id
    assert engine.wait_healthy(healthy, 30)[:2] == (True, "healthy")
    failing = start(docker_engine, basic_image, smoke.KEEPALIVE, healthcheck=FAILING_CHECK)
    assert engine.wait_healthy(failing, 30)[:2] == (False, "unhealthy: failing on purpose")
    unchecked = start(docker_engine, base_image, ["sleep", "60"])
    assert engine.wait_healthy(unchecked, 30).detail == "the image has no HEALTHCHECK"
    ended = start(docker_engine, base_image, ["sh", "-c", "exit 3"])
    ended.wait(timeout=30)
    assert engine.wait_healthy(ended, 30).detail == "the container exited with code 3"
