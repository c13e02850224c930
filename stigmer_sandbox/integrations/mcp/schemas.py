"""The tools' table: each tool's description and JSON schema, and the check of a call's
arguments against it (a bad argument is a `ToolFailure` in one line)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # the SDK's dependency; no stubs

from ...runtime.client.files import MAX_FILE_BYTES

# Defaults and bounds the schemas state and the tools apply.
READ_DEFAULT_BYTES = 1024 * 1024
GREP_DEFAULT_MATCHES = 200
GREP_MAX_MATCHES = 5000


class ToolFailure(Exception):
    """What a tool answers with an error result: one line, said to the client."""


SANDBOX_ARG = {
    "type": "string",
    "description": "the sandbox's name (from sandbox_create, sandbox_fork or sandbox_list); "
    "default: the server's own sandbox, started on first use",
}
PATH_HELP = "a path in the sandbox; relative ones are under /workspace"


def _schema(required: Sequence[str] = (), **properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {**properties, "sandbox": SANDBOX_ARG},
        "required": list(required),
        "additionalProperties": False,
    }


def _text(description: str, **more: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **more}


def _number(description: str, **more: Any) -> dict[str, Any]:
    return {"type": "number", "description": description, "exclusiveMinimum": 0, **more}


def _flag(description: str) -> dict[str, Any]:
    return {"type": "boolean", "description": description, "default": False}


def _list(description: str) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}, "description": description}


@dataclass(frozen=True)
class ToolSpec:
    """One tool as clients see it: what it does and the arguments it takes."""

    description: str
    schema: dict[str, Any]
    read_only: bool = False


TOOLS: dict[str, ToolSpec] = {
    "run": ToolSpec(
        "Run a bash command in the sandbox (as its unprivileged user, in /workspace) and "
        "return stdout, stderr, the exit code and why it ended (exit, timeout, idle, oom, "
        "signal, lost). Everything it started ends with it. With background=true it is "
        "started and its process id returned (see process_output, process_kill).",
        _schema(
            ["command"],
            command=_text("the command, run by bash -c", minLength=1),
            timeout=_number(
                "seconds before it and everything it started is killed (default: the "
                "sandbox's, 600; background: no limit)"
            ),
            session=_text(
                "a named shell session: cd, exports and an activated venv carry over to the "
                "next run in the same session (default: a fresh shell)"
            ),
            background=_flag("start it in the background and return its process id"),
            cwd=_text("working folder, relative to /workspace (default: /workspace)"),
            env={
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "environment variables for the command",
            },
        ),
    ),
    "read_file": ToolSpec(
        "Read a text file from the sandbox (regular files only, never through a symlink).",
        _schema(
            ["path"],
            path=_text(PATH_HELP),
            max_bytes={
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_FILE_BYTES,
                "description": f"read at most this many bytes (default: {READ_DEFAULT_BYTES})",
            },
        ),
        read_only=True,
    ),
    "write_file": ToolSpec(
        "Write a text file in the sandbox, creating its folders; replaces an existing file.",
        _schema(["path", "content"], path=_text(PATH_HELP), content=_text("the file's text")),
    ),
    "list_files": ToolSpec(
        "List a folder in the sandbox: each entry's name, type (file, dir, link, other) and size.",
        _schema(path=_text(f"{PATH_HELP} (default: /workspace)")),
        read_only=True,
    ),
    "glob": ToolSpec(
        "Find paths in the sandbox matching a glob pattern (** matches any depth).",
        _schema(
            ["pattern"],
            pattern=_text("e.g. **/*.py", minLength=1),
            path=_text(f"the folder to search from; {PATH_HELP} (default: /workspace)"),
        ),
        read_only=True,
    ),
    "grep": ToolSpec(
        "Search file contents in the sandbox (recursive, binary files skipped): each match's "
        "path, line number and line.",
        _schema(
            ["pattern"],
            pattern=_text(
                "an extended regular expression (or text with literal=true)", minLength=1
            ),
            path=_text(f"a file or folder; {PATH_HELP} (default: /workspace)"),
            glob=_text("only files whose name matches this glob, e.g. *.py"),
            ignore_case=_flag("match without regard to case"),
            literal=_flag("the pattern is plain text, not a regular expression"),
            max_matches={
                "type": "integer",
                "minimum": 1,
                "maximum": GREP_MAX_MATCHES,
                "description": f"stop after this many matches (default: {GREP_DEFAULT_MATCHES})",
            },
        ),
        read_only=True,
    ),
    "process_list": ToolSpec(
        "List the sandbox's background processes, running and recently ended.",
        _schema(),
        read_only=True,
    ),
    "process_output": ToolSpec(
        "A background process's output so far (head and tail when it printed a lot) and state.",
        _schema(["process_id"], process_id=_text("the id run with background=true returned")),
        read_only=True,
    ),
    "process_kill": ToolSpec(
        "End a background process and everything it started; its final result.",
        _schema(["process_id"], process_id=_text("the id run with background=true returned")),
    ),
    "sandbox_create": ToolSpec(
        "Start a new sandbox and return its name (pass it as `sandbox` to the other tools).",
        _schema(
            egress=_text(
                "public: any public address, never the host or the LAN; allowlist: only the "
                "allow entries; open: everything; none: no network (default: the project's)",
                enum=["public", "allowlist", "open", "none"],
            ),
            allow=_list("destinations it may reach: name, *.name, address or CIDR, optional :port"),
            deny=_list("destinations it may never reach (deny wins)"),
            allow_presets=_list("named allow sets: python, node, debian"),
            isolation=_text(
                "container (the engine's runc) or gvisor (gVisor's kernel between its commands "
                "and the host's; needs `inv engine.install --gvisor`) (default: the project's)",
                enum=["container", "gvisor"],
            ),
            image=_text("the image to run (default: the project's)"),
            snapshot=_text("start from this snapshot (see sandbox_snapshot) instead of an image"),
        ),
    ),
    "sandbox_list": ToolSpec(
        "List the sandboxes this server started: name, which is the default, where it came "
        "from, its state.",
        {"type": "object", "properties": {}, "additionalProperties": False},
        read_only=True,
    ),
    "sandbox_fork": ToolSpec(
        "Start a copy of a sandbox (its installed packages, files and workspace; not its "
        "processes, /tmp or sessions) and return the copy's name.",
        _schema(),
    ),
    "sandbox_snapshot": ToolSpec(
        "Keep a sandbox's filesystem and workspace as a named snapshot, which outlives this "
        "server (start one from it with sandbox_create snapshot=NAME).",
        _schema(
            ["name"],
            name=_text("the snapshot's name: letters, digits, . _ -"),
            replace=_flag("overwrite a snapshot of that name"),
        ),
    ),
    "sandbox_destroy": ToolSpec(
        "Remove a sandbox this server started, with its private workspace.",
        _schema(),
    ),
}


def check_arguments(tool: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
    """The arguments of a call to `tool`, checked against its schema; a ToolFailure in one
    line naming the tool and the argument otherwise."""
    spec = TOOLS.get(tool)
    if spec is None:
        raise ToolFailure(f"unknown tool {tool!r}; the tools are: {', '.join(TOOLS)}")
    given = arguments or {}
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(spec.schema).iter_errors(given)
    )
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path)
        prefix = f"argument {where!r}: " if where else ""
        raise ToolFailure(one_line(f"{tool}: {prefix}{error.message}"))
    return dict(given)


def one_line(text: str, limit: int = 500) -> str:
    """`text` on one line, at most `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
