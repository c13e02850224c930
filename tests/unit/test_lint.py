"""SECURITY.md item 2: the Dockerfiles pass hadolint at warning level; a bad one does not.
The library type-checks."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = str(Path(sys.executable).parent / "hadolint")


def hadolint(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            HADOLINT,
            "--config",
            str(ROOT / ".hadolint.yaml"),
            "--failure-threshold",
            "warning",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_project_dockerfiles_pass():
    done = hadolint(*sorted((ROOT / "dockerfiles").glob("Dockerfile.*")))
    assert done.returncode == 0, done.stdout


def test_known_bad_dockerfile_fails():
    done = hadolint(ROOT / "tests/fixtures/Dockerfile.bad")
    assert done.returncode != 0
    assert "DL3007" in done.stdout or "DL3015" in done.stdout


def test_every_ignored_rule_has_a_written_reason():
    lines = (ROOT / ".hadolint.yaml").read_text().splitlines()
    ignored = yaml.safe_load("\n".join(lines))["ignored"]
    for rule in ignored:
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[index - 1].strip().startswith("#"), f"{rule} has no reason above it"


def test_the_library_type_checks():
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mypy")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout
