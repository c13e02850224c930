"""Warm pool, fork, snapshot and stop/start (issue 14), each beside the same work done by hand.

- `SandboxPool.acquire()` on a warm pool (p50, p95) beside a cold `Sandbox.up()` of an
  ephemeral sandbox and `docker run --rm IMAGE true`. Daytona's published 90 ms is the
  outside anchor (text only, not measured here).
- `Sandbox.fork()` of a sandbox with a 50 MB workspace and a package written under `/`,
  until the fork has run `true`, beside `docker commit` + `cp -a` of the workspace +
  `docker run -d` of the committed image + `docker exec NEW true` until it answers.
- `Sandbox.from_snapshot()` the same way, beside the same by-hand start without the commit.
- `stop()` + `up()` beside `docker stop` + `docker start` + `docker exec true` until it
  answers, on a container configured like the sandbox.
- Idle memory of a pooled sandbox with its agent connected (cgroup usage minus inactive
  file cache) beside a `sleep infinity` container of the same image; how many this host
  holds by that figure, beside a pool of 32 (BENCH_BIG_POOL) actually started (its fill
  time beside as many `docker run -d`) whose every sandbox runs `true`.

The by-hand containers get the sandbox's own limits and confinement (from `docker
inspect`), so only the tool's work differs. Everything runs under a scratch state folder
and workspace, and everything made here (names start `stigmer-bench-<run>`) is removed at
the end, also on failure.

    python benchmarks/pool.py [--runs N]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import ROOT, count_option, docker_cli, percentiles, report, timed

from stigmer_sandbox import config, labels
from stigmer_sandbox.runtime import Sandbox, snapshots
from stigmer_sandbox.runtime.pool import START_WORKERS, SandboxPool

RUN = uuid.uuid4().hex[:6]
PREFIX = f"stigmer-bench-{RUN}"  # every container and image made here starts with it
BENCH_LABEL = f"stigmer-bench.run={RUN}"
DOCKER = docker_cli()
POOL_SIZE = 4
MEMORY_POOL = 8
# How many sandboxes the density figure actually starts (BENCH_BIG_POOL=128 proves more).
BIG_POOL = int(os.environ.get("BENCH_BIG_POOL", "32"))
READY_TIMEOUT_S = 60.0
WORKSPACE_BYTES = 50_000_000
PACKAGE = "/opt/venv/lib/python3.11/site-packages/benchpkg"
MIB = 2**20


def docker(*argv: str) -> str:
    """A docker CLI command that must succeed; its stdout, stripped."""
    done = subprocess.run([DOCKER, *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"docker {' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


def wait_exec(name: str) -> None:
    """Until `docker exec NAME true` succeeds: the by-hand readiness check."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        done = subprocess.run([DOCKER, "exec", name, "true"], capture_output=True, check=False)
        if done.returncode == 0:
            return
        time.sleep(0.02)
    raise SystemExit(f"{name} did not run `true` within {READY_TIMEOUT_S:.0f} s")


def same_config_flags(
    attrs: dict[str, Any], workspace: Path, logs: Path, network: str | None = None
) -> list[str]:
    """`docker run` flags for a container configured like the inspected sandbox (limits,
    confinement, tmpfs, user, command), mounting `workspace` and `logs`, on its network
    or `network`."""
    host, conf = attrs["HostConfig"], attrs["Config"]
    flags = ["--label", BENCH_LABEL, "--user", conf["User"], "--workdir", conf["WorkingDir"]]
    flags += ["--init"] if host.get("Init") else []
    for cap in host.get("CapDrop") or []:
        flags += ["--cap-drop", cap]
    for cap in host.get("CapAdd") or []:
        flags += ["--cap-add", cap]
    for option in host.get("SecurityOpt") or []:
        flags += ["--security-opt", option]
    for path, options in (host.get("Tmpfs") or {}).items():
        flags += ["--tmpfs", f"{path}:{options}"]
    flags += ["--pids-limit", str(host["PidsLimit"]), "--memory", str(host["Memory"])]
    flags += ["--memory-swap", str(host["MemorySwap"]), "--network", network or host["NetworkMode"]]
    if host.get("NanoCpus"):
        flags += ["--cpus", f"{host['NanoCpus'] / 1e9:g}"]
    for source, target in ((workspace, "/workspace"), (logs, "/logs")):
        flags += ["--mount", f"type=bind,src={source},dst={target}"]
    return flags


class Bench:
    """The run's scratch folders, settings, and everything to remove at the end."""

    def __init__(self, scratch: Path, runs: int) -> None:
        self.scratch = scratch
        self.runs = runs
        folders = {key: str(scratch / key) for key in ("workspace", "logs", "state_dir")}
        self.settings = config.load_settings(ROOT).replace(container_name=PREFIX, **folders)
        self.image = self.settings.image
        self.sandboxes: list[Sandbox] = []
        self.pools: list[SandboxPool] = []
        self.images: list[str] = []
        self.snapshot = ""
        self.flags_from: dict[str, Any] = {}
        self.copies = 0

    # -- helpers ---------------------------------------------------------------------------

    def pool(self, size: int, **settings: Any) -> SandboxPool:
        pool = SandboxPool(
            size,
            settings=self.settings.replace(**settings) if settings else self.settings,
            extra_labels={"stigmer-bench.run": RUN},
        )
        self.pools.append(pool)
        return pool

    def close_pool(self, pool: SandboxPool) -> None:
        pool.close()
        self.pools.remove(pool)

    def remove(self, sandbox: Sandbox) -> None:
        sandbox.remove()
        if sandbox in self.sandboxes:
            self.sandboxes.remove(sandbox)

    def folder(self, copy_from: Path | None = None) -> Path:
        """A new by-hand workspace folder, `cp -a` of `copy_from` when given."""
        self.copies += 1
        target = self.scratch / "by-hand" / f"w{self.copies}"
        target.mkdir(parents=True)
        if copy_from is not None:
            subprocess.run(["cp", "-a", "--", f"{copy_from}/.", f"{target}/"], check=True)
        return target

    def run_by_hand(self, image: str, workspace: Path, name: str) -> None:
        """`docker run -d` configured like the sandbox, then wait until it runs `true`."""
        logs = self.scratch / "by-hand" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        command = self.flags_from["Config"]["Cmd"]
        flags = same_config_flags(self.flags_from, workspace, logs)
        docker("run", "-d", "--name", name, *flags, image, *command)
        wait_exec(name)

    def alternate(
        self, ours: Callable[[int], float], by_hand: Callable[[int], float]
    ) -> tuple[float, float]:
        """Medians of `runs` timed calls of each, alternating A B B A so neither goes
        first; each action times itself (its own setup and cleanup stay outside)."""
        mine: list[float] = []
        theirs: list[float] = []
        for index in range(self.runs):
            pair = [(mine, ours), (theirs, by_hand)]
            for samples, action in pair if index % 2 == 0 else reversed(pair):
                samples.append(action(index))
        return statistics.median(mine), statistics.median(theirs)

    def cleanup(self) -> None:
        """Remove everything this run made, whatever state it was left in; each step runs
        even when one before it failed."""

        def containers() -> None:
            by_label = docker("ps", "-aq", "--filter", f"label={BENCH_LABEL}").split()
            by_name = docker("ps", "-aq", "--filter", f"name=^/?{PREFIX}").split()
            left = sorted(set(by_label + by_name))
            if left:
                docker("rm", "-f", *left)

        def images() -> None:
            forks = docker("images", "-q", f"{snapshots.FORK_REPOSITORY}:{PREFIX}*").split()
            for image in [*self.images, *forks]:
                subprocess.run([DOCKER, "rmi", "-f", image], capture_output=True, check=False)

        steps: list[Callable[[], object]] = [pool.close for pool in self.pools]
        steps += [sandbox.remove for sandbox in self.sandboxes]
        if self.snapshot:
            steps.append(lambda: snapshots.delete(self.settings, self.snapshot))
        for step in [*steps, containers, images]:
            try:
                step()
            except (Exception, SystemExit) as exc:
                print(f"  cleanup: {exc}", file=sys.stderr, flush=True)

    # -- 1. warm pool ----------------------------------------------------------------------

    def cold_up(self) -> float:
        box = Sandbox.create_ephemeral(self.settings)
        self.sandboxes.append(box)
        seconds = timed(box.up)
        self.remove(box)
        return seconds

    def acquire(self) -> None:
        samples_n = 6 * self.runs
        pool = self.pool(POOL_SIZE)
        pool.wait_ready()
        samples: list[float] = []
        for _ in range(samples_n):
            started = time.perf_counter()
            box = pool.acquire()
            samples.append((time.perf_counter() - started) * 1000)
            pool.release(box)
            pool.wait_ready()
        self.close_pool(pool)
        cold = statistics.median(self.cold_up() * 1000 for _ in range(self.runs))
        run_rm = statistics.median(
            timed(lambda: docker("run", "--rm", "--label", BENCH_LABEL, self.image, "true")) * 1000
            for _ in range(self.runs)
        )
        p50, p95 = percentiles(samples)
        what = f"pool.acquire() on a warm pool of {POOL_SIZE} ({samples_n} samples"
        anchor = "Daytona claims 90 ms, not measured here)"
        up = f"Sandbox.up() cold, ephemeral (median of {self.runs})"
        report(f"{what}; {anchor} p50", p50, up, cold, "ms", goal="<= 10 ms")
        report(f"{what}; {anchor} p95", p95, up, cold, "ms")
        run_rm_name = f"docker run --rm IMAGE true, CLI (median of {self.runs})"
        report(f"{what}) p50", p50, run_rm_name, run_rm, "ms", goal="<= 10 ms")

    # -- 2-4. fork, snapshot, stop/start ---------------------------------------------------

    def source(self) -> Sandbox:
        """A sandbox with a 50 MB workspace file and a package written under / (the venv)."""
        box = Sandbox.create_ephemeral(self.settings)
        self.sandboxes.append(box)
        box.up()
        script = (
            f"head -c {WORKSPACE_BYTES} /dev/urandom > /workspace/big && mkdir -p {PACKAGE} && "
            f"echo 'VALUE = 42' > {PACKAGE}/__init__.py && "
            f"head -c 5000000 /dev/urandom > {PACKAGE}/data.bin && python -c 'import benchpkg'"
        )
        result = box.exec(script, timeout=120)
        if result.exit_code != 0:
            raise SystemExit(f"preparing the source sandbox failed: {result.stderr!r}")
        self.flags_from = box.inspect()
        return box

    @staticmethod
    def check_copy(box: Sandbox) -> None:
        """The new sandbox has the workspace and the package (checked once, not timed)."""
        check = (
            f"test $(stat -c %s /workspace/big) = {WORKSPACE_BYTES} && python -c 'import benchpkg'"
        )
        result = box.exec(check)
        if result.exit_code != 0:
            raise SystemExit(f"{box.name} lacks the workspace or the package: {result.stderr!r}")

    def fork(self, source: Sandbox) -> None:
        workspace = source.settings.path("workspace")

        def ours(index: int) -> float:
            started = time.perf_counter()
            fork = source.fork()
            self.sandboxes.append(fork)
            fork.exec("true")
            seconds = time.perf_counter() - started
            if index == 0:
                self.check_copy(fork)
            self.remove(fork)
            return seconds

        def by_hand(index: int) -> float:
            image = f"{PREFIX}-fork:{index}"
            name = f"{PREFIX}-hand-fork-{index}"
            self.images.append(image)
            started = time.perf_counter()
            docker("commit", source.name, image)
            self.run_by_hand(image, self.folder(workspace), name)
            seconds = time.perf_counter() - started
            docker("rm", "-f", name)
            docker("rmi", "-f", image)
            return seconds

        fork_s, hand_s = self.alternate(ours, by_hand)
        report(
            f"fork() of a sandbox with a 50 MB workspace and a package under /, until it ran "
            f"`true` (median of {self.runs}; Daytona create-from-snapshot 0.84-1.09 s, external)",
            fork_s,
            "docker commit + cp -a workspace + docker run -d + docker exec true until it "
            "answers, CLI, same config",
            hand_s,
            "s",
            goal="<= 2 s",
        )

    def from_snapshot(self, source: Sandbox) -> None:
        name = f"{PREFIX}-snap"
        self.snapshot = name
        taken = source.snapshot(name)
        image = snapshots.snapshot_image(name)
        workspace = Path(taken["workspace"])
        print(f"  (snapshot {name} taken in {taken['seconds']:.3f} s, not a figure)", flush=True)

        def ours(index: int) -> float:
            started = time.perf_counter()
            box = Sandbox.from_snapshot(name, self.settings)
            self.sandboxes.append(box)
            box.exec("true")
            seconds = time.perf_counter() - started
            if index == 0:
                self.check_copy(box)
            self.remove(box)
            return seconds

        def by_hand(index: int) -> float:
            container = f"{PREFIX}-hand-snap-{index}"
            started = time.perf_counter()
            self.run_by_hand(image, self.folder(workspace), container)
            seconds = time.perf_counter() - started
            docker("rm", "-f", container)
            return seconds

        ours_s, hand_s = self.alternate(ours, by_hand)
        report(
            f"Sandbox.from_snapshot() with a 50 MB workspace, until it ran `true` (median of "
            f"{self.runs})",
            ours_s,
            "docker run -d of the snapshot image + cp -a workspace + docker exec true until it "
            "answers, CLI, same config",
            hand_s,
            "s",
            goal="< 0.84 s (Daytona's create-from-snapshot lower bound)",
        )

    def stop_start(self, source: Sandbox) -> None:
        name = f"{PREFIX}-hand-stop"
        self.run_by_hand(self.image, self.folder(), name)

        def ours(_index: int) -> float:
            started = time.perf_counter()
            source.stop()
            source.up()
            return time.perf_counter() - started

        def by_hand(_index: int) -> float:
            started = time.perf_counter()
            docker("stop", "-t", "5", name)
            docker("start", name)
            wait_exec(name)
            return time.perf_counter() - started

        ours_s, hand_s = self.alternate(ours, by_hand)
        docker("rm", "-f", name)
        report(
            f"stop() + up() until ready (median of {self.runs})",
            ours_s,
            "docker stop -t 5 + docker start + docker exec true until it answers, CLI, same config",
            hand_s,
            "s",
            goal="< 1.1 s (Daytona's stop/start lower bound)",
        )

    # -- 5. memory and density -------------------------------------------------------------

    def memory(self) -> None:
        available = meminfo("MemAvailable")
        pool = self.pool(MEMORY_POOL)
        pool.wait_ready()
        # The waiting sandboxes (agents connected, idle), found by the pool's label: an
        # acquire() here would make the pool start replacements while memory is read.
        # Under the default egress policy each has its gateway (same pool label): what a
        # sandbox costs is both.
        pooled = ("ps", "-q", "--no-trunc", "--filter", f"label={labels.PREFIX}.pool={pool.id}")
        everything = docker(*pooled).split()
        gateways = docker(
            *pooled, "--filter", f"label={labels.KIND}={labels.EGRESS_GATEWAY}"
        ).split()
        waiting = [c for c in everything if c not in gateways]
        if len(waiting) != MEMORY_POOL:
            raise SystemExit(f"expected {MEMORY_POOL} pooled sandboxes, found {len(waiting)}")
        time.sleep(1.0)
        ours = statistics.median(idle_bytes(container) for container in waiting) / MIB
        if gateways:
            ours += statistics.median(idle_bytes(container) for container in gateways) / MIB
        self.close_pool(pool)
        plain = f"{PREFIX}-plain"
        docker("run", "-d", "--name", plain, "--label", BENCH_LABEL, self.image, "sleep", "inf")
        time.sleep(1.0)
        baseline = idle_bytes(docker("inspect", "-f", "{{.Id}}", plain)) / MIB
        docker("rm", "-f", plain)
        report(
            f"idle memory per pooled sandbox and its egress gateway, agent connected (cgroup v1 "
            f"usage_in_bytes - total_inactive_file, medians of {MEMORY_POOL})",
            ours,
            "docker run -d IMAGE sleep infinity, same reading",
            baseline,
            "MiB",
        )
        held = self.density()
        computed = available / (ours * MIB)
        report(
            f"basic sandboxes this host holds at once: MemAvailable {available / 2**30:.1f} GiB "
            "/ idle memory per sandbox",
            computed,
            f"proven: a pool of {BIG_POOL} started, all ran `true`",
            held,
            "sandboxes",
        )

    def density(self) -> int:
        """Fill a pool of 32 (timed, beside 32 sequential `docker run -d`), check each runs
        `true`; how many did."""
        before = meminfo("MemAvailable")
        started = time.perf_counter()
        pool = self.pool(BIG_POOL, pool_max_size=max(BIG_POOL, self.settings.pool_max_size))
        pool.wait_ready(timeout=600)
        fill = time.perf_counter() - started
        during = meminfo("MemAvailable")
        boxes = [pool.acquire() for _ in range(BIG_POOL)]
        held = sum(box.exec("true").exit_code == 0 for box in boxes)
        notes = list(pool.notes)
        self.close_pool(pool)
        logs = self.scratch / "by-hand" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        workspace = self.folder()
        # A sandbox's own network holds that sandbox alone (a /29 behind its gateway): the
        # 32 by hand share the default bridge.
        flags = same_config_flags(self.flags_from, workspace, logs, network="bridge")
        command = self.flags_from["Config"]["Cmd"]
        names = [f"{PREFIX}-hand-many-{index}" for index in range(BIG_POOL)]
        started = time.perf_counter()
        for name in names:
            docker("run", "-d", "--name", name, *flags, self.image, *command)
        sequential = time.perf_counter() - started
        docker("rm", "-f", *names)
        report(
            f"filling a pool of {BIG_POOL} (started, ready, agents connected; the pool starts "
            f"{START_WORKERS} at a time)",
            fill,
            f"{BIG_POOL} sequential docker run -d, CLI, same config on the default bridge "
            "(not waited for)",
            sequential,
            "s",
        )
        host = meminfo("MemTotal")
        pids = BIG_POOL * self.settings.pids_limit
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        print(
            f"  the pool of {BIG_POOL} took {(before - during) / BIG_POOL / MIB:.0f} MiB of "
            f"MemAvailable each (their cgroups, plus what the host spends per container, plus "
            f"whatever else ran meanwhile); limits add "
            f"up to {BIG_POOL * self.settings.memory_bytes / 2**30:.0f} GiB of memory (host "
            f"{host / 2**30:.1f} GiB) and {pids} pids (kernel.pid_max {pid_max}); pool.notes: "
            f"{notes or 'none'}",
            flush=True,
        )
        return held


def meminfo(key: str) -> int:
    """A /proc/meminfo figure, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    raise SystemExit(f"no {key} in /proc/meminfo")


def idle_bytes(container_id: str) -> int:
    """A container's memory as `docker stats` counts it on cgroup v1: usage_in_bytes minus
    total_inactive_file (v2: memory.current minus inactive_file)."""
    v1 = Path("/sys/fs/cgroup/memory/docker") / container_id
    v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope")
    if v1.is_dir():
        usage, stat, key = v1 / "memory.usage_in_bytes", v1 / "memory.stat", "total_inactive_file"
    elif v2.is_dir():
        usage, stat, key = v2 / "memory.current", v2 / "memory.stat", "inactive_file"
    else:
        raise SystemExit(f"no memory cgroup found for container {container_id[:12]}")
    fields = dict(line.split() for line in stat.read_text().splitlines())
    return int(usage.read_text()) - int(fields[key])


def phase(name: str, action: Callable[[], object]) -> None:
    """Run one part, saying on stderr how long it took (the script must stay short)."""
    print(f"  [{name}: {timed(action):.1f} s]", file=sys.stderr, flush=True)


def main(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="stigmer-bench-") as scratch:
        bench = Bench(Path(scratch), runs)
        try:
            phase("warm pool", bench.acquire)
            source = bench.source()
            phase("fork", lambda: bench.fork(source))
            phase("snapshot", lambda: bench.from_snapshot(source))
            phase("stop/start", lambda: bench.stop_start(source))
            bench.remove(source)
            phase("memory and density", bench.memory)
        finally:
            bench.cleanup()
            shutil.rmtree(Path(scratch) / "by-hand", ignore_errors=True)


if __name__ == "__main__":
    main(count_option(__doc__, "runs", 5, "timed runs of each median (acquire: 6x as many)"))
