"""An MCP server: any MCP client runs commands, files and sandboxes in stigmer sandboxes.

    stigmer-sandbox mcp                       # stdio: the MCP client starts it
    stigmer-sandbox mcp --http --port 8765    # streamable HTTP on 127.0.0.1, bearer token

Tools: `run` (timeout, session, background), `read_file`, `write_file`, `list_files`,
`glob`, `grep`, `process_list` / `process_output` / `process_kill`, and `sandbox_create` /
`sandbox_list` / `sandbox_fork` / `sandbox_snapshot` / `sandbox_destroy`. Every tool takes
an optional `sandbox` (a name this server gave out); without one it uses the server's own
sandbox, started on first use with the project's settings. Every sandbox the server
starts is ephemeral (labelled with this process as its owner, plus `MCP_LABEL`), removed
when the server exits, and found by `inv clean` if the server is killed first.

Results carry the exit code, the exit cause (exit, timeout, idle, oom, signal, lost) and
which stream lost bytes to the output limit, read through `adapter`. A bad argument, an
unknown sandbox or a failure of the sandbox is an MCP error result (`isError`) in one line;
the server keeps serving. A command is ended in the sandbox, its whole tree, when its call
is cancelled: the client's cancel notification, the stdio client going away, an HTTP
session deleted, or (HTTP) the connection that carried the call dropping.

Built on the official SDK's low-level `Server`, not FastMCP: the tools' JSON schemas are one
table (`schemas`), checked with the SDK's jsonschema so a bad argument is one line we word
(FastMCP hands back pydantic's multi-line report); each result is a `CallToolResult` with
both a text block and `structuredContent`, with `isError` ours to set; and the HTTP app is
the SDK's session manager behind a bearer-token check, without FastMCP's OAuth machinery.
Needs the `mcp` extra (`pip install 'stigmer-sandbox[mcp]'`); only `inv mcp` imports this
package.

Its modules, each importing only those before it: `schemas` (the tools' table and the
argument check), `results` (replies), `sandboxes` (the server's sandboxes and their
labels), `tools` (the tools over those sandboxes, via `adapter`) and `server` (the MCP
server, its transports and `serve`).
"""

from .sandboxes import MCP_LABEL, parse_labels
from .server import DEFAULT_PORT, serve

__all__ = ["DEFAULT_PORT", "MCP_LABEL", "parse_labels", "serve"]
