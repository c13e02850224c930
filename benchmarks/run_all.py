"""Run every benchmark and write BENCHMARKS.md: value, baseline, ratio, goal, machine.

python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = (
    "exec_latency.py",
    "sessions.py",
    "concurrent_exec.py",
    "throughput.py",
    "big_outputs.py",
    "deepagents_backend.py",
    "adapters.py",
    "mcp_server.py",
    "sandbox_start.py",
    "pool.py",
    "pause.py",
    "gvisor.py",
    "checkpoint.py",
    "egress.py",
    "credentials.py",
    "cli_run.py",
    "rebuild.py",
    "startup.py",
    "image_sizes.py",
    "cold_build.py",
)
QUICK_SKIPS = {"cold_build.py"}


def goal_met(value: float, goal: str) -> str:
    match = re.match(r"^\s*(<=|<|>=|>)\s*([\d.]+)", goal)
    if not match:
        return ""
    limit = float(match.group(2))
    ok = {"<=": value <= limit, "<": value < limit, ">=": value >= limit, ">": value > limit}[
        match.group(1)
    ]
    return "yes" if ok else "**no**"


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"{platform.node()}: {platform.system()} {platform.release()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}"
    )


def write(rows: list[dict], target: Path) -> None:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `inv bench` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine()}.",
        "",
        "Each figure was measured beside its baseline in the same run; compare ratios, not",
        "absolute numbers, across machines.",
        "",
        "| figure | value | baseline | baseline value | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['figure']} | {row['value']:.3f} {row['unit']} | {row['baseline_name']} | "
            f"{row['baseline']:.3f} {row['unit']} | {row['ratio']:.3g} | {row['goal'] or '-'} | "
            f"{goal_met(row['value'], row['goal']) or '-'} |"
        )
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare() -> None:
    """Everything the benchmarks measure must exist first (the test suite's last test
    removes the project's images): `inv dev-full` makes it, and does nothing when it is."""
    print("== preparing: inv dev-full", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "dev-full", "--progress", "plain"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"inv dev-full failed; nothing was measured:\n{done.stderr[-2000:]}")


def main(quick: bool) -> int:
    prepare()
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as sink:
        results = Path(sink.name)
    failed = []
    for script in ORDER:
        if quick and script in QUICK_SKIPS:
            continue
        print(f"== {script}", flush=True)
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script)],
            env={**os.environ, "BENCH_JSON": str(results)},
            check=False,
        )
        if done.returncode:
            failed.append(script)
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    results.unlink()
    write(rows, ROOT / "BENCHMARKS.md")
    print(f"wrote BENCHMARKS.md ({len(rows)} figures)" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the cold build (minutes)")
    sys.exit(main(parser.parse_args().quick))
