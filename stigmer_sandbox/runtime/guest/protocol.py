"""What the host and the in-container programs agree on, defined once for both sides.

Standard-library Python only, importing nothing of the package: this file is sent into the
sandbox first among the agent's sources (and before `file_batch`), and the host imports it,
so both sides read the same paths, names, exit meanings and deadlines. Host code imports
this module and `capture`, nothing else of `guest/`.

The deadline budget. For a command with timeout T:

- the helper (`stigmer-exec --timeout T --kill-grace KILL_GRACE_S`) ends the command's
  whole tree at T; its kill rounds give up after KILL_GRACE_S, saying so in its status;
- the agent steps in only if the helper has not exited by T + BACKSTOP_AFTER_S: it sends
  the helper SIGTERM and waits BACKSTOP_WAIT_S more before killing it;
- the host waits for the answer until T + HOST_GRACE_S, by which time the agent's backstop
  has used its whole budget; past that, the command alone comes back `lost`.

Every stage's bound is larger than the sum of the ones inside it, so a slower stage never
gives up on a faster one that is still within its own budget. A background process's
`kill` waits KILL_WAIT_S for its helper to end the tree.
"""

from __future__ import annotations

import re

# How long the helper keeps killing a tree once asked (SIGSTOP/SIGKILL rounds); a healthy
# tree ends in milliseconds: only uninterruptible sleeps (D state) take longer.
KILL_GRACE_S = 5.0
# Slack for each hand-over between stages (a scheduling delay, a pipe, a frame).
MARGIN_S = 1.0
# The agent's backstop: after the timeout, then after its SIGTERM to the helper.
BACKSTOP_AFTER_S = KILL_GRACE_S + MARGIN_S
BACKSTOP_WAIT_S = KILL_GRACE_S + MARGIN_S
# The host's hard deadline for an answer, after the command's timeout.
HOST_GRACE_S = BACKSTOP_AFTER_S + BACKSTOP_WAIT_S + MARGIN_S
# `Process.kill`: the keeper's helper ends the tree within KILL_GRACE_S of its SIGTERM.
KILL_WAIT_S = KILL_GRACE_S + MARGIN_S

# The root-owned helper every command runs through (installed from the host, see
# `runtime.host_helper`); it exits TIMEOUT_EXIT when the command's timeout ended it.
EXEC_HELPER = "/usr/local/libexec/stigmer-sandbox/stigmer-exec"
TIMEOUT_EXIT = 124
# The agent sends a frame at least this often: the host judges liveness by it.
HEARTBEAT_S = 1.0
# What a session's name and its exported variables' names may be.
SESSION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Kernel interfaces, not files: reading them can block, never end or leak the process's
# own state, and writing them is never a file upload.
KERNEL_TREES = ("/proc", "/sys", "/dev")
# A file transfer's answer for a file left for the next round trip (the reply was full).
DEFERRED = "deferred"

# How the host starts the agent: the sources (`guest.AGENT_SOURCES`) arrive as one JSON
# line on stdin, so `ps` shows these lines, not 40 kB of code; keeper.py's `main()` runs.
BOOTSTRAP = (
    "# stigmer-sandbox agent\n"
    "import sys, json\n"
    "STIGMER_SOURCES = json.loads(sys.stdin.buffer.readline())\n"
    "for _source in [STIGMER_SOURCES] if isinstance(STIGMER_SOURCES, str) else STIGMER_SOURCES:\n"
    "    exec(_source)\n"
    "main()\n"
)


def exit_cause(
    exit_code: int | None,
    signal_number: int | None,
    timed_out: bool,
    oom_killed: bool,
    idle_timed_out: bool = False,
) -> str:
    """Why a command ended: lost, timeout, idle, oom, signal or exit."""
    if exit_code is None:
        return "lost"
    if timed_out:
        return "timeout"
    if idle_timed_out:
        return "idle"
    if oom_killed:
        return "oom"
    if signal_number:
        return "signal"
    return "exit"


def oom_grew(before: int | None, after: int | None) -> bool:
    return before is not None and after is not None and after > before
