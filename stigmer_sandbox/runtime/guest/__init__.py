"""The programs that run inside the sandbox, as the host sends them.

Every module here is standard-library Python 3.11 that imports nothing of the package: the
host reads these files and sends their sources into the container, where they run as
`/usr/bin/python3 -I -S`. On the host, only `protocol` (names, paths, exit meanings and the
deadline budget both sides agree on) and `capture` (how output is read and capped) are
imported; the rest is only ever sent (`tests/unit/test_layering.py` holds both rules).

- `agent`: the command agent on one attached exec stream (then `keeper`'s `main`).
- `keeper`: background processes, each under its own keeper that outlives the agent.
- `shell_state`: named shell sessions' saved state.
- `file_batch`: one file-transfer round trip, run as the sandbox user.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent


def source(name: str) -> str:
    """The source text of the guest module `name` (as it is sent, unchanged)."""
    return (_HERE / f"{name}.py").read_text(encoding="utf-8")


# The agent's program: each source runs in turn in one namespace, so a later one uses the
# names an earlier one defined (keeper.py's `main` runs last).
AGENT_SOURCES = [source(name) for name in ("protocol", "capture", "shell_state", "agent", "keeper")]
# A file transfer: `python3 -I -S -c BATCH_SOURCE OP` runs protocol.py, then file_batch.py
# as the main module (one argument, far below Linux's 128 KiB per argument).
BATCH_SOURCE = (
    "# stigmer-sandbox file transfer\n"
    f"for _source in {[source('protocol'), source('file_batch')]!r}:\n"
    "    exec(_source)\n"
)
