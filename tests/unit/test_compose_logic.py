"""Compose command construction (v1 and v2) and the compose-file validator, without Docker."""

from pathlib import Path

import pytest

from stigmer_sandbox import config, policy
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.host import compose

ROOT = Path(__file__).resolve().parents[2]


def project(tool: compose.ComposeTool) -> compose.ComposeProject:
    return compose.ComposeProject(tool, Path("/p"), (Path("/p/a.yml"), Path("/p/b.yml")), {})


def test_v2_command():
    tool = compose.ComposeTool(("docker", "compose"), "v2", "2.29.1")
    assert project(tool).argv("up", "-d") == [
        "docker",
        "compose",
        "--project-name",
        "stigmer-sandbox",
        "--project-directory",
        "/p",
        "--file",
        "/p/a.yml",
        "--file",
        "/p/b.yml",
        "up",
        "-d",
    ]


def test_v1_before_1_27_needs_compatibility_for_deploy_limits():
    old = compose.ComposeTool(("docker-compose",), "v1", "1.26.2")
    new = compose.ComposeTool(("docker-compose",), "v1", "1.29.2")
    assert "--compatibility" in project(old).argv("up")
    assert "--compatibility" not in project(new).argv("up")


def test_detect_prefers_v2_then_v1(monkeypatch):
    versions = {"docker": "2.29.1", "docker-compose": "1.29.2"}
    monkeypatch.setattr(compose, "_probe", lambda argv: versions.get(argv[0]))
    assert compose.detect("auto").flavour == "v2"
    assert compose.detect("v1").prefix == ("docker-compose",)
    versions.pop("docker")
    assert compose.detect("auto").flavour == "v1"
    versions.clear()
    with pytest.raises(compose.SandboxError, match="Docker Compose is not installed"):
        compose.detect("auto")


def mounts(tmp_path, **environment: str) -> compose.MountContext:
    """Volume sources resolved as for a project in `tmp_path`."""
    settings = config.Settings(project_dir=str(tmp_path))
    return compose.MountContext(environment, tmp_path, policy.Protected.of(settings))


def write(tmp_path, text):
    path = tmp_path / "c.yml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("privileged: true", "privileged: true is not allowed"),
        ("network_mode: host", "network_mode: host"),
        ("pid: host", "pid: host"),
        ("volumes: ['/var/run/docker.sock:/var/run/docker.sock']", "Docker socket"),
        ("volumes: ['~/.aws:/home/sandbox/.aws']", "with :ro, it would be allowed"),
        ("volumes: [{type: bind, source: /etc, target: /x}]", "system folder /etc"),
        ("volumes: ['/etc/cron.d:/x']", "system folder /etc"),
        ("volumes: ['${STIGMER_WORKSPACE:-./workspace}:/workspace']", "the project folder"),
        ("volumes: ['${NOT_SET_ANYWHERE:-/}:/host:ro']", "volumes: / (/)"),
        ("cap_add: [SYS_ADMIN]", "cap_add"),
        ("devices: ['/dev/sda:/dev/sda']", "devices"),
    ],
)
def test_validator_refuses_with_one_line(tmp_path, service, expected):
    path = write(tmp_path, f"services:\n  sandbox:\n    image: x\n    {service}\n")
    with pytest.raises(ConfigError) as caught:
        compose.validate(path, mounts(tmp_path, STIGMER_WORKSPACE=str(tmp_path)))
    message = str(caught.value)
    assert expected in message and "service 'sandbox'" in message and "\n" not in message


def test_validator_accepts_read_only_credentials_and_the_project_files(tmp_path):
    context = mounts(tmp_path)
    compose.validate(write(tmp_path, "services:\n  s:\n    volumes: ['~/.aws:/a:ro']\n"), context)
    for name in (compose.BASE_FILE, compose.ADVANCED_FILE, compose.DATABASE_FILE):
        compose.validate(ROOT / name, context)


def test_project_checks_the_workspace_before_writing_anything(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    settings = config.Settings(project_dir=str(project), workspace=str(project))
    with pytest.raises(ConfigError, match=r"^workspace: .*the project folder"):
        compose.project(settings)
    assert list(project.iterdir()) == []


def test_validator_names_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yml: invalid YAML at line"):
        compose.validate(write(tmp_path, "services: [\n"), mounts(tmp_path))
