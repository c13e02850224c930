"""The sandbox runtime: containers, the command channel and its in-container agent, the
audit trail (`history`) and the security audit of a running sandbox (`security_audit`)."""

from .channel import OutputCallback
from .sandbox import ExecOptions, ExecResult, Sandbox, interactive_shell, run_local

__all__ = [
    "ExecOptions",
    "ExecResult",
    "OutputCallback",
    "Sandbox",
    "interactive_shell",
    "run_local",
]
