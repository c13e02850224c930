"""The sandbox runtime: containers (`sandbox`), local mode (`local`), what a command is and
returns (`commands`), how commands travel (`channel`) and run inside (`agent`), the audit
trail (`history`), warm pools (`pool`), fork and snapshot (`snapshots`, `workspaces`),
and the security audit of a running sandbox (`security_audit`)."""

from .channel import OutputCallback
from .commands import ExecOptions, ExecResult
from .local import LocalSandbox, open_sandbox
from .pool import SandboxPool
from .processes import Process, ProcessOutput
from .sandbox import Sandbox, interactive_shell
from .sessions import Session

__all__ = [
    "ExecOptions",
    "ExecResult",
    "LocalSandbox",
    "OutputCallback",
    "Process",
    "ProcessOutput",
    "Sandbox",
    "SandboxPool",
    "Session",
    "interactive_shell",
    "open_sandbox",
]
