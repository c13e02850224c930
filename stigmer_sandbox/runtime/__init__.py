"""The sandbox runtime, in three places:

- `guest/`: the programs that run inside the container (the agent, background-process
  keepers, session state, file transfers), standard library only, sent as source;
- `client/`: the host's client of a running sandbox: requests and results, the agent
  channel, the `Connection`, sessions, background processes and file transfers;
- `backends/`: the platform seam and the Docker Engine implementation;

and the lifecycle beside them: `sandbox` (create, start, stop, remove), `forking` (fork,
snapshot, private sandboxes), `containers`, `snapshots`, `workspaces`, `pool`, `local`
(commands on this host), the warm relay's server and the security audit.
"""

from .client.commands import ExecOptions, ExecResult, OutputCallback
from .client.connection import Connection
from .client.processes import Process, ProcessOutput
from .client.sessions import Session
from .local import LocalSandbox, open_sandbox
from .pool import SandboxPool
from .sandbox import Sandbox

__all__ = [
    "Connection",
    "ExecOptions",
    "ExecResult",
    "LocalSandbox",
    "OutputCallback",
    "Process",
    "ProcessOutput",
    "Sandbox",
    "SandboxPool",
    "Session",
    "open_sandbox",
]
