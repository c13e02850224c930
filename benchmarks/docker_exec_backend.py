"""The docker-exec baseline for deepagents_backend.py: a real PyPI backend, used unchanged.

The deepagents sandbox backends on PyPI that run on a local Docker Engine pay one
`docker exec` per command: deepagents-docker 0.1.2 (one `docker exec` CLI process per
command, files through a host folder it mounts), langchain-docker-backend 1.1.0 and
langchain-docker 0.1.0 (one docker SDK `exec_run` per command, files through
`put_archive` / `get_archive`). Only langchain-docker attaches to a container it did not
create (the others always start their own from an image), so it is the one that runs
unchanged on the benchmark's sandbox container:

- `DockerSandbox.from_container(NAME).open()` finds the running container;
- `execute(command)` is one `exec_run(["bash", "-c", command], demux=True)`, waited for
  in a thread of its own (its timeout);
- `upload_files` is, per file, an `exec_run` of `mkdir -p PARENT`, a `put_archive` and an
  `exec_run` checking the size; `download_files` one `get_archive` per file.

It is installed only for the benchmark, never as a project dependency: pinned by hash,
`pip install --no-deps --target` into the project's state folder, imported from there.
What it imports (deepagents, docker) is in the dev extra. Its metadata asks for Python
3.13, but nothing in it needs more than 3.11 (hence `--ignore-requires-python`).

One setting is not its default: `timeout_cleanup="none"`, because its default answer to
a command timeout is to kill the container (here, the benchmark's sandbox). It has no
user option, so its commands run as the container's configured user: in a
stigmer sandbox that is root holding only CAP_SETUID, CAP_SETGID and CAP_KILL (no
CAP_DAC_OVERRIDE), where `StigmerSandbox` runs them as the sandbox user through
`stigmer-exec`; `put_archive` / `get_archive` act as the engine, with every privilege.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import ROOT

from stigmer_sandbox import config

PACKAGE = "langchain-docker"
VERSION = "0.1.0"
MODULE = "langchain_dockersandbox"
# sha256 of langchain_docker-0.1.0.tar.gz (the only file of that release).
SHA256 = "ad7beea8710003135e6b4f6aee91fd4065f0253a64d4b10d312ece7a7ae3d0a8"
LABEL = f"{PACKAGE} {VERSION} DockerSandbox (one docker exec per command)"


def install() -> Path:
    """The folder holding the package, installed there on first use (about 3 s)."""
    target = config.load_settings(ROOT).path("state_dir") / "bench" / f"{PACKAGE}-{VERSION}"
    if (target / MODULE).is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        requirements = Path(staging) / "requirements.txt"
        requirements.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SHA256}\n")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--ignore-requires-python",
                "--target",
                str(Path(staging) / "site"),
                "-r",
                str(requirements),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            raise SystemExit(
                f"could not install the baseline {PACKAGE}=={VERSION} with pip:\n"
                f"{done.stderr[-2000:]}"
            )
        shutil.move(str(Path(staging) / "site"), target)  # whole, or not at all
    return target


def attach(container: str) -> Any:
    """The package's `DockerSandbox`, open on the running `container` (name or id)."""
    folder = str(install())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    package = importlib.import_module(MODULE)
    backend = package.DockerSandbox.from_container(container, timeout_cleanup="none")
    backend.open()
    return backend
