"""`inv run` end to end on the project's default sandbox, beside `docker exec`.

`inv run "true"`, `inv run --session NAME "true"` and the console script's
`stigmer-sandbox run "true"` (answered from the warm relay without Invoke) on the running
default sandbox
(`stigmer-sandbox` unless configured otherwise), each beside `docker exec CONTAINER true`
(the CLI) on the same container, in the same run, timed in blocks A B C C B A (see
`abba_ms`). Each call is a whole process, as a user types it: interpreter start, imports,
settings, connecting the agent, the command. Goal (issue 21): the console script no slower
than docker exec. `inv` cannot get there (importing Invoke alone takes most of docker
exec's time), so its rows stand beside `inv --version` as well, the floor every `inv` command
pays (Python and Invoke, no task loaded), to show what `inv run` adds to it.

It runs `inv sandbox.up` first (nothing to do when the sandbox runs), removes the
sandbox at the end only if it was the one that created it, and closes its session.
Quick to re-run alone:

    python benchmarks/cli_run.py [--runs N]
"""

from __future__ import annotations

import statistics
import sys
import uuid
from pathlib import Path

from _common import INV, ROOT, abba_ms, count_option, docker_cli, report, run

from stigmer_sandbox import config
from stigmer_sandbox.runtime import Sandbox

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("stigmer-sandbox"))


def main(runs: int) -> None:
    settings = config.load_settings(ROOT)
    box = Sandbox(settings)
    created = box.find() is None
    run([*INV, "sandbox.up"])
    session = f"bench-{uuid.uuid4().hex[:8]}"
    baseline = [docker_cli(), "exec", box.name, "true"]
    try:
        samples = abba_ms(
            {
                "run": lambda: run([*INV, "run", "true"]),
                "session": lambda: run([*INV, "run", "--session", session, "true"]),
                "console": lambda: run([CONSOLE_SCRIPT, "run", "true"]),
                "docker": lambda: run(baseline),
                "floor": lambda: run([*INV, "--version"]),
            },
            runs,
        )
    finally:
        box.session(session).close()
        box.close()
        if created:
            run([*INV, "sandbox.down"])
    docker_ms = statistics.median(samples["docker"])
    floor_ms = statistics.median(samples["floor"])
    for command, key in (("inv run 'true'", "run"), ("inv run --session NAME 'true'", "session")):
        value = statistics.median(samples[key])
        figure = f"{command} on the running default sandbox (median of {runs})"
        report(figure, value, f"docker exec {box.name} true (CLI), same container", docker_ms, "ms")
        report(figure, value, "inv --version (Python and Invoke alone, the floor)", floor_ms, "ms")
    report(
        f"stigmer-sandbox run 'true' (warm relay, no Invoke) on the running default sandbox "
        f"(median of {runs})",
        statistics.median(samples["console"]),
        f"docker exec {box.name} true (CLI), same container",
        docker_ms,
        "ms",
        goal=f"<= {docker_ms:.1f} ms (no slower than docker exec)",
    )


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 10, "timed runs of each"))
