"""The development environment's lock: every package `.[dev]` needs, pinned with hashes.

`requirements/dev.lock` is what `.ci/run` and the README's first command install (pip's
hash-checking mode: a changed or swapped file on the index fails the install), so a new
release of a tool cannot turn CI red with no change here. `uv pip compile` writes it for
every platform (`--universal`); `inv deps.upgrade` refreshes it and runs the suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

LOCK_FILE = Path("requirements") / "dev.lock"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
LOCKER = "uv"  # a PyPI package: installed into this environment when missing
# A plain path entry in site-packages rather than setuptools' import hook, which costs
# every Python start (`inv`, the console script) about 20 ms.
EDITABLE = ("--config-settings", "editable_mode=compat")


def lock_command(upgrade: bool) -> list[str]:
    """`uv pip compile` of pyproject.toml's dev extra into the lock file."""
    argv = [
        str(Path(sys.executable).parent / LOCKER),
        "pip",
        "compile",
        "pyproject.toml",
        "--extra",
        "dev",
        "--universal",
        "--python-version",
        PYTHON_VERSION,
        "--generate-hashes",
        "--quiet",
        "--output-file",
        str(LOCK_FILE),
    ]
    return [*argv, "--upgrade"] if upgrade else argv


def install_commands(root: Path) -> list[list[str]]:
    """Install the locked packages (hashes checked; by uv where this environment has it,
    as `scripts/setup-env` does), then this project without its deps."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    locker = Path(sys.executable).parent / LOCKER
    installer = (
        [str(locker), "pip", "install", "--quiet", "--python", sys.executable]
        if locker.exists()
        else pip
    )
    return [
        [*installer, "--require-hashes", "--requirement", str(root / LOCK_FILE)],
        [*pip, "--no-deps", "--editable", str(root), *EDITABLE],
    ]


def locker_install_command() -> list[str] | None:
    """The command that installs the locker into this environment, or None if it is there."""
    if (Path(sys.executable).parent / LOCKER).exists():
        return None
    return [sys.executable, "-m", "pip", "install", "--quiet", LOCKER]
