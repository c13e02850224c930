"""A command's deadlines, defined once for the host, the in-container agent and the helper.

Standard-library Python only: this file is also sent into the sandbox (first among the
agent's sources), so both sides read the same numbers. For a command with timeout T:

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
