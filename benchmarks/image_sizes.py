"""Image sizes (uncompressed and gzip of `docker save`) against the guide and the goals.

python benchmarks/image_sizes.py [IMAGE ...]
"""

from __future__ import annotations

import sys
import zlib

from _common import INV, ROOT, report, run

from stigmer_sandbox import engine, images
from stigmer_sandbox.images import smoke

GUIDE_MB = {"basic": 300, "full": 1500}
GOALS = {"basic": ("<= 560 MB", "<= 200 MB"), "full": ("<= 2000 MB", "")}


def compressed_size(image) -> int:
    """Bytes of `docker save IMAGE | gzip` (level 6), streamed."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    total = 0
    for chunk in image.save(chunk_size=1 << 20):
        total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def tools_note(name: str, kind: str) -> str:
    """Which tools of tools.yaml the measured full image really holds (their checks pass
    in it) and which it lacks: this machine cannot download them all, and the guide's
    figure is for all of them."""
    if kind != "full":
        return ""
    with smoke.probe_container(name) as container:
        checks = [smoke.run_check(container, check) for check in smoke.tool_checks(container)]
    held = {c.name.removeprefix("tool ") for c in checks if c.passed}
    known = images.load_tools(ROOT / images.CONTEXT_DIR)
    missing = [tool for tool in known if tool not in held]
    note = f", holding {', '.join(sorted(held)) or 'none of its tools'}"
    return note + (f"; without {', '.join(missing)}" if missing else "")


def ensure_images(names: list[str]) -> None:
    """Build what is missing; the full image with the tools this machine can fetch."""
    if "stigmer-sandbox-basic:local" in names:
        run([*INV, "sandbox.build-basic"])
    if "stigmer-sandbox-full:local" in names and not engine.image_id("stigmer-sandbox-full:local"):
        tools = images.load_tools(ROOT / images.CONTEXT_DIR)
        downloads = [n for n, spec in tools.items() if spec["source"] == "download"]
        print(f"building full without the tools this machine cannot download: {downloads}")
        run([*INV, "sandbox.build-full", *[a for n in downloads for a in ("--skip-tool", n)]])


def main(names: list[str]) -> None:
    ensure_images(names)
    for name in names:
        kind = "full" if "full" in name else "basic"
        image = engine.image(name)
        size_mb = image.attrs["Size"] / 1000**2
        packed_mb = compressed_size(image) / 1000**2
        size_goal, packed_goal = GOALS[kind]
        holding = tools_note(name, kind)
        report(
            f"{kind} image size (uncompressed){holding}",
            size_mb,
            "guide's promise",
            GUIDE_MB[kind],
            "MB",
            goal=size_goal,
        )
        report(
            f"{kind} image size (gzip of docker save){holding}",
            packed_mb,
            "uncompressed",
            size_mb,
            "MB",
            goal=packed_goal,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["stigmer-sandbox-basic:local", "stigmer-sandbox-full:local"])
