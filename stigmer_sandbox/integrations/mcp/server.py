"""The MCP server: `build_server` over the tools, a call cancelled when its client leaves,
the stdio and streamable HTTP transports (bearer token, loopback only), and `serve`."""

from __future__ import annotations

import contextlib
import hmac
import io
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
from mcp import types
from mcp.server.lowlevel import Server

from ... import __version__
from ...config import Settings
from ...errors import UsageError
from ...runtime import egress_spares
from .results import Reply
from .sandboxes import Sandboxes
from .schemas import TOOLS
from .tools import Tools

SERVER_NAME = "stigmer-sandbox"
TOKEN_ENV = "STIGMER_MCP_TOKEN"
MIN_TOKEN_CHARS = 16
HOST = "127.0.0.1"
DEFAULT_PORT = 8765
HTTP_PATH = "/mcp"
# How often a call carried by HTTP checks that its connection is still there.
DISCONNECT_POLL_S = 0.25


def tool_list() -> list[types.Tool]:
    """Every tool as `tools/list` gives it."""
    return [
        types.Tool(
            name=name,
            description=spec.description,
            inputSchema=spec.schema,
            annotations=types.ToolAnnotations(readOnlyHint=spec.read_only),
        )
        for name, spec in TOOLS.items()
    ]


def build_server(tools: Tools) -> Server[Any, Any]:
    """The MCP server answering `tools/list` and `tools/call` with `tools`."""
    server: Server[Any, Any] = Server(
        SERVER_NAME,
        version=__version__,
        instructions="Run commands and edit files in local, hardened Docker sandboxes. Without "
        "a `sandbox` argument every tool uses this server's own sandbox (started on first "
        "use); sandbox_create and sandbox_fork start more, all removed when the server exits.",
    )

    @server.list_tools()
    async def list_tools() -> list[types.Tool]:
        return tool_list()

    @server.call_tool(validate_input=False)  # checked in `Tools.call`, in one line
    async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        request = server.request_context.request  # HTTP: the request that carried the call
        reply = await unless_client_leaves(lambda: tools.call(name, arguments), request)
        return reply.result()

    return server


async def unless_client_leaves(work: Callable[[], Awaitable[Reply]], request: Any) -> Reply:
    """`work()`, cancelled when the HTTP connection that carried the call drops (the SDK
    would let it run on in the session; cancelling ends its command in the sandbox)."""
    if request is None or not hasattr(request, "is_disconnected"):
        return await work()  # stdio: the transport closing cancels the call already
    done: list[Reply] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(DISCONNECT_POLL_S)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        done.append(await work())
        group.cancel_scope.cancel()
    if not done:
        return Reply("the client went away; the call was cancelled", error=True)
    return done[0]


# -- transports ------------------------------------------------------------------------------


async def serve_stdio(server: Server[Any, Any], protocol_out: io.BufferedWriter) -> None:
    """Serve one client over stdin and `protocol_out` until stdin closes."""
    from mcp.server.stdio import stdio_server

    writer = anyio.wrap_file(io.TextIOWrapper(protocol_out, encoding="utf-8"))
    async with stdio_server(stdout=writer) as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


class BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer <token>` (compared
    in constant time), else 401."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.allowed(scope):
            body = b'{"error": "unauthorized: send Authorization: Bearer <token>"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"www-authenticate", b'Bearer realm="stigmer-sandbox"'),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def allowed(self, scope: dict[str, Any]) -> bool:
        given = b""
        for name, value in scope.get("headers") or []:
            if name.lower() == b"authorization":
                given = value
        return hmac.compare_digest(given, self.expected)


class _SessionApp:
    """The SDK's session manager as an ASGI endpoint (a class: Starlette passes it the raw
    ASGI call, as the SDK's own app does)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.manager.handle_request(scope, receive, send)


def http_app(server: Server[Any, Any], token: str) -> Any:
    """The streamable HTTP app at `HTTP_PATH`, behind the bearer token; Host and Origin
    must be loopback ones (no DNS rebinding)."""
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from mcp.server.transport_security import TransportSecuritySettings
    from starlette.applications import Starlette
    from starlette.routing import Route

    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{HOST}:*", "localhost:*"],
        allowed_origins=[f"http://{HOST}:*", "http://localhost:*"],
    )
    manager = StreamableHTTPSessionManager(app=server, security_settings=security)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        async with manager.run():
            yield

    app = Starlette(routes=[Route(HTTP_PATH, endpoint=_SessionApp(manager))], lifespan=lifespan)
    return BearerAuth(app, token)


def bound_socket(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:`port` (0: a free port); one line when taken."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        why = f"cannot listen on {HOST}:{port}: {exc.strerror}"
        raise UsageError(why, "pick another --port") from None
    sock.listen(128)
    return sock


def _not_a_closed_stream(record: logging.LogRecord) -> bool:
    """False for the SDK's report of a client closing its event stream (an ordinary end,
    logged with a traceback at ERROR level)."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, anyio.ClosedResourceError)


async def serve_http(server: Server[Any, Any], sock: socket.socket, token: str) -> None:
    """Serve streamable HTTP on `sock` until SIGINT or SIGTERM (uvicorn's own handling)."""
    import uvicorn

    logging.getLogger("mcp.server.streamable_http").addFilter(_not_a_closed_stream)

    config = uvicorn.Config(
        http_app(server, token),
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    await uvicorn.Server(config).serve(sockets=[sock])


def token_from(environ: dict[str, str] | os._Environ[str]) -> tuple[str, bool]:
    """The bearer token: `STIGMER_MCP_TOKEN` if set (at least 16 characters), else a new
    random one; whether it was generated."""
    given = environ.get(TOKEN_ENV)
    if given is None:
        return secrets.token_urlsafe(32), True
    if len(given.strip()) < MIN_TOKEN_CHARS or given != given.strip():
        raise UsageError(
            f"{TOKEN_ENV} must be at least {MIN_TOKEN_CHARS} characters without spaces around"
        )
    return given, False


@contextlib.contextmanager
def protocol_stdout() -> Iterator[io.BufferedWriter]:
    """The real stdout for the protocol alone: whatever else writes to fd 1 or sys.stdout
    meanwhile (a library's print, a child process) goes to stderr instead of corrupting
    the stream."""
    sys.stdout.flush()
    saved = os.dup(1)
    protocol_out = os.fdopen(os.dup(1), "wb")  # the SDK flushes after each message
    os.dup2(2, 1)
    previous = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield protocol_out
    finally:
        sys.stdout = previous
        os.dup2(saved, 1)
        os.close(saved)
        protocol_out.close()


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt meanwhile, as SIGINT does, so that the
    sandboxes are removed however the server is asked to stop (uvicorn raises the signal
    again once it has shut down)."""
    wanted = (signal.SIGTERM, signal.SIGHUP)
    before = {number: signal.signal(number, signal.default_int_handler) for number in wanted}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored meanwhile (removing the sandboxes must finish)."""
    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {number: signal.signal(number, signal.SIG_IGN) for number in wanted}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def serve(
    settings: Settings,
    *,
    http: bool = False,
    port: int = DEFAULT_PORT,
    extra_labels: dict[str, str] | None = None,
    say: Callable[[str], None] | None = None,
) -> list[tuple[str, str | None]]:
    """Serve MCP over stdio (default) or streamable HTTP on 127.0.0.1:`port` until the
    client leaves or a signal ends it; then remove every sandbox the server started
    (returned: each name and the error that kept it, if any). `say` gets the lines for a
    person (stderr by default): the URL and a generated token, printed once."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    sandboxes = Sandboxes(settings, extra_labels)
    server = build_server(Tools(sandboxes))
    try:
        with signals_interrupt():
            _serve(server, http, port, say)
    except KeyboardInterrupt:
        pass
    finally:
        with signals_held():  # before a client's SIGKILL: it gives stdio servers ~4 s
            removed = sandboxes.close()
            egress_spares.discard_all()  # else at exit, outside this window
    for name, error in removed:
        say(f"removed sandbox {name}" if error is None else f"could not remove {name}: {error}")
    return removed


def _serve(server: Server[Any, Any], http: bool, port: int, say: Callable[[str], None]) -> None:
    if http:
        token, generated = token_from(os.environ)
        sock = bound_socket(port)
        say(f"MCP server (streamable HTTP) on http://{HOST}:{sock.getsockname()[1]}{HTTP_PATH}")
        say(f"bearer token: {token}" if generated else f"bearer token: from {TOKEN_ENV}")
        anyio.run(serve_http, server, sock, token)
    else:
        with protocol_stdout() as protocol_out:
            anyio.run(serve_stdio, server, protocol_out)
