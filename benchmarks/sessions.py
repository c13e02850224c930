"""Named sessions and background processes on a warm sandbox, beside what peer tools do.

- `Session.exec("true")` p50/p95 beside a persistent shell driven by prompt scraping as
  SWE-agent drives one: SWE-ReX's `BashSession` protocol (pexpect; PS1 set to a sentinel;
  send the command, expect the prompt; send `echo EXITCODESTART$?EXITCODEEND`, expect it
  and the prompt), here over one long-lived `docker exec -it` bash on the same sandbox,
  as its user, in /workspace. OpenHands' pexpect `BashSession` used the same two round
  trips; its later tmux session polls the pane, slower by design. One change to the
  peer: pexpect's default 50 ms sleep before each send (SWE-ReX keeps it: 100 ms a
  command) is off, so the baseline measures the protocol, not a sleep. The same run also
  gives `Session.exec` beside `Sandbox.exec("true")`: what keeping a session costs.
- Background processes: `Sandbox.start(["sleep", "600"])`, `Sandbox.processes()` and
  `Process.kill()` p50/p95 beside `docker exec -d` (start), `docker exec ... ps` (list)
  and `docker exec ... kill PID` (kill), same user, folder and sandbox. Every process is
  killed, and checked gone, before the sandbox is removed.

Everything is timed in blocks A B ... B A (see `abba_ms`).

    python benchmarks/sessions.py [--runs N]    (process figures take N/10 of each)
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import TypeVar

import pexpect
from _common import ROOT, abba_ms, count_option, docker_cli, report_latency, run

from stigmer_sandbox import config
from stigmer_sandbox.runtime import Process, Sandbox

SESSION_GOALS = ("<= 3 ms", "<= 5 ms")  # the bar Sandbox.exec has (exec_latency.py)
PROCESS_GOALS = ("<= 10 ms", "")
WORKDIR = "/workspace"
LONG_LIVED = ["sleep", "600"]
PEER_TIMEOUT_S = 30
Item = TypeVar("Item")


class PromptShell:
    """SWE-ReX's `BashSession` protocol over one `docker exec -it ... bash` (see above)."""

    PS1 = "SHELLPS1PREFIX"
    EXIT_START, EXIT_END = "EXITCODESTART", "EXITCODEEND"

    def __init__(self, docker: str, container: str, user: str) -> None:
        prompt = [f"PS1={self.PS1}", "PS2=", "PS0="]
        argv = ["exec", "-it", "-u", user, "-w", WORKDIR]
        argv += [part for pair in prompt for part in ("-e", pair)]
        self.shell = pexpect.spawn(
            docker,
            [*argv, container, "bash"],
            encoding="utf-8",
            codec_errors="backslashreplace",
            echo=False,
            timeout=PEER_TIMEOUT_S,
        )
        self.shell.delaybeforesend = None
        # The container's terminal echoes input (SWE-ReX's pty is local, echo off): turn
        # it off, and reset the prompt ~/.bashrc set, as SWE-ReX does after start-up.
        self.shell.sendline(f"stty -echo; export PS1='{self.PS1}' PS2='' PS0=''; echo R$((6*7))")
        self.shell.expect_exact("R42")
        self.shell.expect_exact(self.PS1)

    def exec(self, command: str) -> int:
        """Run one command; its exit code."""
        self.shell.sendline(command)
        self.shell.expect_exact(self.PS1)
        self.shell.sendline(f"\necho {self.EXIT_START}$?{self.EXIT_END}")
        self.shell.expect_exact(self.EXIT_END)
        found = re.findall(f"{self.EXIT_START}([0-9]+)", str(self.shell.before))
        self.shell.expect_exact(self.PS1)
        if len(found) != 1:
            raise SystemExit(f"the prompt-scraping baseline lost the exit code of {command!r}")
        return int(found[0])

    def close(self) -> None:
        self.shell.close(force=True)


def checked(code: int | None, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} failed (exit {code}); nothing was measured")


def compare_sessions(box: Sandbox, docker: str, user: str, runs: int) -> None:
    session = box.session(f"bench-{uuid.uuid4().hex[:8]}")
    peer = PromptShell(docker, box.name, user)
    try:
        checked(session.exec("true").exit_code, "Session.exec('true')")
        checked(peer.exec("true"), "the prompt-scraping shell")
        samples = abba_ms(
            {
                "session": lambda: session.exec("true"),
                "exec": lambda: box.exec("true"),
                "peer": lambda: peer.exec("true"),
            },
            runs,
        )
    finally:
        peer.close()
        session.close()
    report_latency(
        "Session.exec('true')",
        samples["session"],
        "one docker exec -it bash, SWE-ReX prompt scraping (pexpect)",
        samples["peer"],
        goals=SESSION_GOALS,
    )
    report_latency(
        "Session.exec('true') (what a session costs)",
        samples["session"],
        "Sandbox.exec('true'), same run",
        samples["exec"],
    )


class DockerExecProcesses:
    """The baseline: background processes with the docker CLI alone."""

    def __init__(self, docker: str, container: str, user: str) -> None:
        self.exec = [docker, "exec", "-u", user, "-w", WORKDIR]
        self.container = container
        self.uid = user.partition(":")[0]

    def start(self) -> None:
        run([*self.exec, "-d", self.container, *LONG_LIVED])

    def listing(self) -> list[str]:
        """`ps` of the sandbox user's processes: each line pid, parent pid and command."""
        ps = ["ps", "-o", "pid=,ppid=,args=", "-u", self.uid]
        return run([*self.exec, self.container, *ps]).splitlines()

    def running(self) -> list[str]:
        """Pids of the long-lived processes it started that still run: those `docker exec`
        started have no parent in the container (the library's have their helper)."""
        wanted = ["0", *LONG_LIVED]
        return [line.split()[0] for line in self.listing() if line.split()[1:] == wanted]

    def kill(self, pid: str) -> None:
        run([*self.exec, self.container, "kill", pid])


def popper(items: list[Item], action: Callable[[Item], object]) -> Callable[[], object]:
    """An action that takes the next item of `items` (each call its own)."""
    return lambda: action(items.pop())


def compare_processes(box: Sandbox, docker: str, user: str, runs: int) -> None:
    peer = DockerExecProcesses(docker, box.name, user)
    ours: list[Process] = []
    try:
        started = abba_ms(
            {"ours": lambda: ours.append(box.start(LONG_LIVED)), "peer": peer.start}, runs
        )
        theirs = peer.running()
        if len(theirs) != len(ours) or sum(p["running"] for p in box.processes()) != len(ours):
            raise SystemExit(f"expected {len(ours)} running processes on each side")
        listed = abba_ms({"ours": box.processes, "peer": peer.listing}, runs)
        killed = abba_ms(
            {"ours": popper(ours, Process.kill), "peer": popper(theirs, peer.kill)}, runs
        )
    finally:
        for process in ours:
            process.kill()
        for pid in peer.running():
            peer.kill(pid)
    left = sum(p["running"] for p in box.processes()) + len(peer.running())
    if left:
        raise SystemExit(f"{left} background processes survived their kill")
    for what, samples, baseline in (
        ("Sandbox.start(['sleep', '600'])", started, "docker exec -d"),
        ("Sandbox.processes()", listed, "docker exec ... ps"),
        ("Process.kill()", killed, "docker exec ... kill PID"),
    ):
        report_latency(what, samples["ours"], baseline, samples["peer"], goals=PROCESS_GOALS)


def main(runs: int) -> None:
    docker = docker_cli()
    with Sandbox.create_ephemeral(config.load_settings(ROOT)) as box:
        user = "{}:{}".format(*box.sandbox_user)
        box.exec("true")  # connects the agent
        compare_sessions(box, docker, user, runs)
        compare_processes(box, docker, user, max(runs // 10, 4))


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 300, "timed session commands of each kind"))
