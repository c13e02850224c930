"""`mcp`: serve sandboxes to MCP clients (stdio, or streamable HTTP on loopback)."""

from __future__ import annotations

from invoke import Context

from ..errors import UsageError
from ._common import EGRESS_LISTS, SANDBOX_HELP, egress_settings, task

DEFAULT_PORT = 8765  # the integration's own default; not imported here (start-up time)


@task(
    help={
        "http": "serve streamable HTTP on 127.0.0.1 instead of stdio; clients must send the "
        "bearer token printed at start, or the one in STIGMER_MCP_TOKEN (default: off, stdio)",
        "port": f"the HTTP port on 127.0.0.1, 0 for a free one; needs --http "
        f"(default: {DEFAULT_PORT})",
        "label": "KEY=VALUE label on every sandbox the server starts, repeatable (default: none)",
        **SANDBOX_HELP,
    },
    iterable=["label", *EGRESS_LISTS],
    auto_shortflags=False,  # `-h` would be --http; after a task name users mean help
)
def mcp(
    c: Context,
    http: bool = False,
    port: int | None = None,
    label: list[str] | None = None,
    egress: str | None = None,
    allow: list[str] | None = None,
    deny: list[str] | None = None,
    allow_preset: list[str] | None = None,
    secret: list[str] | None = None,
    isolation: str | None = None,
) -> None:
    """Serve the sandbox to MCP clients: run, files, processes, sandboxes (stdio or HTTP)."""
    if port is not None and not http:
        raise UsageError("--port is for --http; stdio needs no port")
    try:
        from ..integrations import mcp as server  # the SDK loads only when it starts
    except ImportError as exc:
        raise UsageError(
            f"the MCP server needs the mcp package ({exc.name} is missing)",
            "pip install 'stigmer-sandbox[mcp]'",
        ) from None
    current = egress_settings(c, egress, allow, deny, allow_preset, secret, isolation=isolation)
    chosen = server.DEFAULT_PORT if port is None else port
    extra = server.parse_labels(label or [])
    removed = server.serve(current, http=http, port=chosen, extra_labels=extra)
    if any(error for _name, error in removed):
        raise UsageError("some sandboxes could not be removed; `inv clean` removes them")


TASKS = (mcp,)
