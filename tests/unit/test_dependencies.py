"""The development lock: complete, pinned, hashed, and what CI and the README install."""

from __future__ import annotations

import re
import tomllib

from stigmer_sandbox.host import dependencies

from ..conftest import ROOT

LOCK = ROOT / dependencies.LOCK_FILE


def locked() -> dict[str, str]:
    """Each locked requirement's name (normalised) and the text of its entry."""
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text(encoding="utf-8"))
    found = {}
    for entry in entries:
        if entry.startswith("#"):
            continue
        name = re.split(r"[=\[ ;]", entry, maxsplit=1)[0]
        found[re.sub(r"[-_.]+", "-", name).lower()] = entry
    return found


def test_every_locked_package_is_pinned_with_hashes():
    entries = locked()
    assert len(entries) > 50
    for name, entry in entries.items():
        assert re.match(r"^[A-Za-z0-9._-]+(\[[^\]]*\])?==\S+", entry), name
        assert "--hash=sha256:" in entry, name


def test_every_direct_dependency_and_dev_tool_is_locked():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    names = {
        re.sub(r"[-_.]+", "-", re.split(r"[<>=!\[ ;]", w, maxsplit=1)[0]).lower() for w in wanted
    }
    assert names - set(locked()) == set()


def test_ci_and_the_readme_install_the_lock_with_hashes_checked():
    for text in ((ROOT / ".ci" / "run").read_text(), (ROOT / "README.md").read_text()):
        assert "scripts/setup-env" in text
    script = (ROOT / "scripts" / "setup-env").read_text()
    assert str(dependencies.LOCK_FILE) in script
    commands = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    installs = [line for line in commands if " install " in line]
    assert len(installs) == 4  # uv's entry, the lock by uv, by pip if uv cannot, the project
    assert all("--require-hashes" in line or "--no-deps -e ." in line for line in installs)


def test_the_lock_is_made_for_every_platform_with_hashes():
    argv = dependencies.lock_command(upgrade=True)
    assert {"--universal", "--generate-hashes", "--upgrade"} <= set(argv)
    assert "--upgrade" not in dependencies.lock_command(upgrade=False)
