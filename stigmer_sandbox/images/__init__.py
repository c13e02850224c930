"""Image building: the Debian base from Debian's archive, content-addressed builds of the
basic and full images, smoke tests and size reports.

`stigmer_sandbox.images` is the builder's API; the submodules hold the rest:
`debian_base` (debootstrap base image), `ca` (extra CA bundle), `smoke` (image
checks), `inventory` (tool versions and where the bytes go).
"""

from .builder import (
    CA_CONTEXT_PATH,
    CONTEXT_DIR,
    BaseChoice,
    BuildOptions,
    BuildOutcome,
    BuildPlan,
    BuildWatcher,
    build,
    check_skipped,
    content_hash,
    context_files,
    context_tar,
    default_tags,
    diagnose,
    image_for_user,
    load_tools,
    parse_build_args,
    plan,
    proxy_args,
    resolve_base,
)

__all__ = [
    "CA_CONTEXT_PATH",
    "CONTEXT_DIR",
    "BaseChoice",
    "BuildOptions",
    "BuildOutcome",
    "BuildPlan",
    "BuildWatcher",
    "build",
    "check_skipped",
    "content_hash",
    "context_files",
    "context_tar",
    "default_tags",
    "diagnose",
    "image_for_user",
    "load_tools",
    "parse_build_args",
    "plan",
    "proxy_args",
    "resolve_base",
]
