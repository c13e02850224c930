"""Command latency on a warm sandbox, and what privilege separation costs per command.

Figures, each beside its baseline from the same run:
- p50/p95/p99 of `Sandbox.exec("true")` vs `docker exec` (CLI) and the SDK's `exec_run`,
  all on the same warm sandbox (ours sampled 4x as often as the baselines, so that its
  p99 is not one stray delay), back to back (each command sent as the last one's answer
  arrives: the agent starts its next warm helper and shell meanwhile, on the same 2 cores);
- the same at an agent's pace (a pause between commands, far shorter than a model's
  turn: the warm helpers are ready when a command comes);
- where that time goes, beside the same CLI baseline: the p50 of the agent channel's
  `ping` round trip (the transport, no process started) and of `Sandbox.exec(["true"])`
  (a process started, no bash);
- inside that sandbox, one command through `stigmer-exec` (the root helper that switches
  to the sandbox user, reaps and kills the tree) vs the same command started directly,
  both from one shell loop: the price of privilege separation.
(Sandbox start and `inv run` end to end are in sandbox_start.py.)

    python benchmarks/exec_latency.py [--runs N]
"""

from __future__ import annotations

import shutil
import statistics
import time

from _common import ROOT, count_option, report, run, timed

from stigmer_sandbox import config, policy
from stigmer_sandbox.runtime import Sandbox

LOOP = (
    "start=$(date +%s%N); for i in $(seq {n}); do {command}; done; "
    "echo $(( $(date +%s%N) - start ))"
)


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """p50, p95 and p99 of `samples`."""
    ordered = sorted(samples)
    last = len(ordered) - 1
    return statistics.median(ordered), ordered[int(0.95 * last)], ordered[int(0.99 * last)]


# Between two commands of an agent's run there is at least a model call (seconds); this
# is far less, so the figure is not flattered by idle time.
AGENT_PAUSE_S = 0.02


# A p99 of 300 samples is their third-worst: one stray scheduling delay moves it by a
# millisecond. The sandbox's own commands are cheap, so they get this many times the runs.
TAIL_SAMPLES = 4


def sample(action, runs: int, pause_s: float = 0.0) -> list[float]:
    action()  # warm-up
    samples = []
    for _ in range(runs):
        time.sleep(pause_s)
        samples.append(timed(action) * 1000)
    return samples


def loop_ms(container, command: str, n: int) -> float:
    """Milliseconds per iteration of `command` in a shell loop inside the sandbox (as root,
    as the agent starts the helper)."""
    script = LOOP.format(n=n, command=command)
    code, output = container.exec_run(["/bin/bash", "-c", script], user="0:0")
    if code != 0:
        raise SystemExit(f"benchmark loop failed: {output.decode(errors='replace')[-500:]}")
    return int(output.decode().split()[-1]) / n / 1e6


def main(runs: int) -> None:
    settings = config.load_settings(ROOT)
    docker = shutil.which("docker")
    if docker is None:
        raise SystemExit("the docker CLI is needed for the baselines")
    with Sandbox.create_ephemeral(settings) as box:
        ours = sample(lambda: box.exec("true"), runs * TAIL_SAMPLES)
        paced = sample(lambda: box.exec("true"), runs * TAIL_SAMPLES, AGENT_PAUSE_S)
        no_bash = sample(lambda: box.exec(["true"]), runs)
        channel = box.connect().connection.channel
        if channel is None:
            raise SystemExit("the sandbox agent is not connected: no channel to ping")
        transport = sample(channel.ping, runs)
        cli = sample(lambda: run([docker, "exec", box.name, "true"]), runs)
        container = box.find()
        sdk = sample(lambda: container.exec_run(["true"]), runs)
        uid, gid = box.sandbox_user
        helper = f"{policy.EXEC_HELPER} --uid {uid} --gid {gid} --cwd /workspace -- /bin/true"
        separated = statistics.median(loop_ms(container, helper, runs) for _ in range(3))
        direct = statistics.median(loop_ms(container, "/bin/true", runs) for _ in range(3))
    goals = (("p50", 0, "<= 3 ms"), ("p95", 1, "<= 5 ms"), ("p99", 2, "<= 6 ms"))
    for label, index, goal in goals:
        value = percentiles(ours)[index]
        for baseline, samples in (("docker exec (CLI)", cli), ("SDK exec_run", sdk)):
            report(
                f"Sandbox.exec('true') {label}",
                value,
                baseline,
                percentiles(samples)[index],
                "ms",
                goal=goal,
            )
    for label, index, goal in goals:
        report(
            f"Sandbox.exec('true') {label} at an agent's pace ({AGENT_PAUSE_S * 1000:.0f} ms "
            "between commands)",
            percentiles(paced)[index],
            "docker exec (CLI)",
            percentiles(cli)[index],
            "ms",
            goal=goal,
        )
    cli_p50 = percentiles(cli)[0]
    for figure, samples in (
        ("agent channel ping round trip p50 (transport only)", transport),
        ("Sandbox.exec(['true']) p50 (a process, no bash)", no_bash),
    ):
        report(figure, percentiles(samples)[0], "docker exec (CLI)", cli_p50, "ms")
    report(
        "one command through stigmer-exec (privilege separation), in the sandbox",
        separated,
        "the same command started directly",
        direct,
        "ms",
    )


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 300, "timed commands each"))
