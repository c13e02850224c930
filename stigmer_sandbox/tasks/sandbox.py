"""`sandbox.*`: the sandbox images and the sandbox container."""

from __future__ import annotations

from invoke import Collection, Context

from .. import base_image, console
from ._common import settings, task


@task(
    help={
        "mirror": "Debian mirror URL, e.g. an internal mirror (default: config debian_mirror, "
        "else debootstrap's default)",
        "force": "rebuild even when an identical base image exists (default: off)",
    }
)
def bootstrap_base(c: Context, mirror: str | None = None, force: bool = False) -> None:
    """Build the Debian base image from Debian's archive (no registry needed)."""
    current = settings(c, debian_mirror=mirror)
    progress = console.Progress("bootstrap-base")

    def on_line(line: str) -> None:
        progress.update(line, phase=base_image.phase_of(line))

    try:
        result = base_image.bootstrap(current.base_image, current.debian_mirror, force, on_line)
    finally:
        progress.finish()
    size = console.human_bytes(result.size_bytes)
    if result.built:
        console.success(f"built {result.image} ({size}) in {progress.elapsed:.0f} s")
    else:
        console.success(f"up to date: {result.image} ({size}, inputs {result.inputs})")


ns = Collection("sandbox", bootstrap_base)
