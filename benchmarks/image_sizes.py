"""Image sizes (uncompressed and gzip of `docker save`) against the guide and the goals.

python benchmarks/image_sizes.py [IMAGE ...]
"""

from __future__ import annotations

import json
import sys
import zlib

from _common import INV, ROOT, report, run

from stigmer_sandbox import engine, images

GUIDE_MB = {"basic": 300, "full": 1500}
GOALS = {"basic": ("<= 560 MB", "<= 200 MB"), "full": ("<= 2000 MB", "")}


def compressed_size(image) -> int:
    """Bytes of `docker save IMAGE | gzip` (level 6), streamed."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    total = 0
    for chunk in image.save(chunk_size=1 << 20):
        total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def tools_note(client, name: str, kind: str) -> str:
    """Which tools the measured full image holds (this machine cannot download them all)."""
    if kind != "full":
        return ""
    manifest = client.containers.run(name, ["cat", "/opt/tools/manifest.json"], remove=True)
    return f", with {', '.join(sorted(json.loads(manifest)))}"


def ensure_images(names: list[str]) -> None:
    """Build what is missing; the full image with the tools this machine can fetch."""
    client = engine.client()
    if "stigmer-sandbox-basic:local" in names:
        run([*INV, "sandbox.build-basic"])
    if "stigmer-sandbox-full:local" in names and not client.images.list(
        name="stigmer-sandbox-full:local"
    ):
        tools = images.load_tools(ROOT / images.CONTEXT_DIR)
        downloads = [n for n, spec in tools.items() if spec["source"] == "download"]
        print(f"building full without the tools this machine cannot download: {downloads}")
        run([*INV, "sandbox.build-full", *[a for n in downloads for a in ("--skip-tool", n)]])


def main(names: list[str]) -> None:
    ensure_images(names)
    client = engine.client()
    for name in names:
        kind = "full" if "full" in name else "basic"
        image = client.images.get(name)
        size_mb = image.attrs["Size"] / 1000**2
        packed_mb = compressed_size(image) / 1000**2
        size_goal, packed_goal = GOALS[kind]
        report(
            f"{kind} image size (uncompressed){tools_note(client, name, kind)}",
            size_mb,
            "guide's promise",
            GUIDE_MB[kind],
            "MB",
            goal=size_goal,
        )
        report(
            f"{kind} image size (gzip of docker save)",
            packed_mb,
            "uncompressed",
            size_mb,
            "MB",
            goal=packed_goal,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["stigmer-sandbox-basic:local", "stigmer-sandbox-full:local"])
