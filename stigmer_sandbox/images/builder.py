"""Building the sandbox images: content-addressed, streamed, explained on failure.

A build's identity is a hash of everything that decides its result: the
Dockerfile, every file of the build context (after `.dockerignore`), the build
arguments that matter, the extra CA, and the base image's id. The image is
tagged `<name>:sha-<hash>`; when that tag exists the builder is never called.
Builds go through the Engine API (the SDK's classic builder), streamed, with
the context made here so an extra CA can be injected without touching the
user's files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from .. import __version__, engine, labels, policy
from ..config import IMAGE_RE, Settings, split_image
from ..errors import BuildError, SandboxError, UsageError
from . import ca, debian_base
from .record import ImageRecord

KINDS = ("basic", "full")
# Images that are not sandboxes (kind -> folder under dockerfiles/, Dockerfile): built and
# content-addressed like the others, each from its own folder, which the sandbox images'
# context leaves out (dockerfiles/.dockerignore), so neither rebuilds the other.
SERVICE_KINDS = {
    "egress": ("egress", "Dockerfile.egress-gateway"),
    "broker": ("broker", "Dockerfile.broker"),
}
SOURCE_URL = "https://github.com/stigmer/stigmer-sandbox"
CONTEXT_DIR = "dockerfiles"
CA_CONTEXT_PATH = "certs/zz-stigmer-extra-ca.crt"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "FTP_PROXY", "ALL_PROXY")
# Build args that change on every build but not the image's contents.
UNHASHED_ARGS = {"BUILD_DATE", "VCS_REF", *PROXY_VARS, *(v.lower() for v in PROXY_VARS)}
STEP_RE = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
# The image a step produced (or found in the cache), as the classic builder prints it.
STEP_IMAGE_RE = re.compile(r"^\s*---> ([0-9a-f]{12})\s*$")
BUILD_ARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HINTS = (
    (("no space left on device",), "Docker's disk is full: free space with `inv clean --all`"),
    (
        (
            "integrity mismatch",
            "checksum mismatch",
            "eintegrity",
            "hash sum mismatch",
            "do not match the hashes",
            "sha256 mismatch",
        ),
        "a download does not match its pinned checksum: check the mirror or the pin",
    ),
    (
        (
            "certificate_verify_failed",
            "self-signed certificate",
            "self_signed_cert_in_chain",
            "unable to get local issuer certificate",
            "certificate verify failed",
        ),
        "TLS verification failed: behind a TLS-inspecting proxy, pass its CA with --ca-cert PATH",
    ),
    (
        (
            "temporary failure resolving",
            "could not resolve",
            "network is unreachable",
            "enotfound",
            "eai_again",
            "name or service not known",
            "failed to establish a new connection",
            "could not connect",
            "econnrefused",
            "failed to fetch",
            "getaddrinfo",
        ),
        "the build has no network: check the connection, HTTP(S)_PROXY, `--network host`, "
        "or the daemon's DNS (`inv doctor` shows a daemon.json snippet)",
    ),
)


@dataclass(frozen=True)
class BuildOptions:
    """What a user can ask of a build (the task flags)."""

    tags: tuple[str, ...] = ()
    no_cache: bool = False
    pull: bool = False
    target: str | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    network: str | None = None
    ca_cert: str = ""
    force: bool = False


@dataclass(frozen=True)
class BaseChoice:
    """The base image a build starts from, and why that one."""

    reference: str
    image_id: str
    reason: str


@dataclass(frozen=True)
class BuildPlan:
    """Everything decided before the builder is called."""

    kind: str
    dockerfile: str
    context_dir: Path
    files: tuple[Path, ...]
    build_args: dict[str, str]
    labels: dict[str, str]
    tags: tuple[str, ...]
    hash_tag: str
    inputs: str
    extra_ca: ca.ExtraCA | None
    base: BaseChoice
    options: BuildOptions
    record: ImageRecord


@dataclass(frozen=True)
class BuildOutcome:
    """The summary after a build (or after finding it up to date)."""

    image_id: str
    tags: tuple[str, ...]
    size_bytes: int
    seconds: float
    built: bool
    steps: int = 0
    cached_steps: int = 0


class BuilderRun(NamedTuple):
    """What one call of the builder made: the image and its step counts."""

    image_id: str
    steps: int
    cached_steps: int


class BuildWatcher(Protocol):
    """Receives a build's progress: notes, steps, and raw log lines."""

    def note(self, text: str) -> None: ...

    def step(self, number: int, total: int, instruction: str) -> None: ...

    def line(self, text: str) -> None: ...


def image_name(kind: str, target: str | None = None) -> str:
    """Repository name of an image kind (`stigmer-sandbox-basic`), or of a build target."""
    return f"stigmer-sandbox-{target or kind}"


def default_tags(kind: str, target: str | None = None) -> tuple[str, ...]:
    """`:local` (the guide's tag) and `:v<version>` (its best practice)."""
    name = image_name(kind, target)
    return (f"{name}:local", f"{name}:v{__version__}")


def parse_build_args(pairs: Iterable[str]) -> dict[str, str]:
    """`K=V` strings → dict; one clear error for anything else."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not BUILD_ARG_RE.match(key):
            raise UsageError(f"--build-arg must be KEY=VALUE, got {pair!r}")
        parsed[key] = value
    return parsed


def load_tools(context: Path) -> dict[str, dict[str, Any]]:
    """The full image's tool pins (`dockerfiles/tools.yaml`)."""
    import yaml

    path = context / "tools.yaml"
    try:
        tools = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("tools")
    except (OSError, yaml.YAMLError) as exc:
        raise SandboxError(f"cannot read {path}: {exc}") from None
    if not isinstance(tools, dict) or not tools:
        raise SandboxError(f"{path}: needs a 'tools' mapping")
    return tools


def check_skipped(context: Path, skipped: Iterable[str]) -> str:
    """Validated `--skip-tool` names as the build argument (comma-separated, sorted)."""
    known = load_tools(context)
    names = sorted(set(skipped))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(
            f"unknown tool {unknown[0]!r} for --skip-tool", f"known tools: {', '.join(known)}"
        )
    return ",".join(names)


def _ignore_patterns(context: Path) -> list[tuple[bool, str]]:
    ignore = context / ".dockerignore"
    if not ignore.is_file():
        return []
    patterns = []
    for raw in ignore.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, line.lstrip("!").strip("/")))
    return patterns


def _ignored(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    ignored = False
    for negate, pattern in patterns:
        bare = pattern.removeprefix("**/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, bare) for part in parts)
        )
        if hit:
            ignored = not negate
    return ignored


def context_files(context: Path, dockerfile: str) -> tuple[Path, ...]:
    """Files sent to the builder: the context minus `.dockerignore`, plus the Dockerfile."""
    patterns = _ignore_patterns(context)
    chosen = []
    for path in sorted(context.rglob("*")):
        relative = path.relative_to(context).as_posix()
        if (path.is_file() or path.is_symlink()) and (
            relative == dockerfile or not _ignored(relative, patterns)
        ):
            chosen.append(path)
    return tuple(chosen)


def content_hash(
    context: Path,
    files: Iterable[Path],
    *,
    hashed_args: dict[str, str],
    base_id: str,
    extra_ca: bytes,
    target: str | None,
) -> str:
    """The build's identity: context contents, args, base id, CA, target, tool version."""
    digest = hashlib.sha256()
    for part in (__version__, base_id, target or "", repr(sorted(hashed_args.items()))):
        digest.update(part.encode() + b"\0")
    digest.update(hashlib.sha256(extra_ca).digest())
    for path in files:
        relative = path.relative_to(context).as_posix()
        executable = bool(path.stat().st_mode & 0o111)  # the rule normalized_entry uses
        digest.update(f"{relative}\0{int(executable)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _try_pull(reference: str) -> str | None:
    try:
        with engine.engine_errors():
            return str(engine.client().images.pull(reference).id)
    except SandboxError:
        return None


def resolve_base(settings: Settings, pull: bool, watcher: BuildWatcher) -> BaseChoice:
    """Upstream base if present (or pullable), else the project's own, bootstrapped if needed."""
    upstream = settings.upstream_base
    found = _try_pull(upstream) if pull else engine.image_id(upstream)
    if found:
        return BaseChoice(upstream, found, "upstream image" + (" (pulled)" if pull else ""))
    own = settings.base_image
    found = engine.image_id(own)
    if found is None and not pull:
        found = _try_pull(upstream)
        if found:
            return BaseChoice(upstream, found, "upstream image (pulled)")
    if found is None:
        watcher.note(f"no base image: bootstrapping {own} from Debian's archive (~30 s)")
        made = debian_base.bootstrap(
            own, settings.debian_mirror, on_line=watcher.line, record=ImageRecord.of(settings)
        )
        found = engine.image_id(own) or made.image_id
    return BaseChoice(own, found, f"project base ({upstream} cannot be pulled here)")


def _base_for(
    kind: str,
    settings: Settings,
    options: BuildOptions,
    watcher: BuildWatcher,
    extra_args: dict[str, str],
) -> tuple[BaseChoice, dict[str, str]]:
    """What the Dockerfile of `kind` starts from, and the build args that say so."""
    if kind == "full":
        basic = extra_args["BASIC_IMAGE"]
        found = engine.image_id(basic)
        if found is None:
            raise SandboxError(f"{basic} not found", "run `inv sandbox.build-basic` first")
        return BaseChoice(basic, found, "the basic image"), {}
    base = resolve_base(settings, options.pull, watcher)
    return base, {"BASE_IMAGE": base.reference, "KEEP_EXTRA_CA": str(int(settings.keep_extra_ca))}


def _git_revision(root: Path) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def plan(
    settings: Settings,
    kind: str,
    options: BuildOptions,
    watcher: BuildWatcher,
    extra_args: dict[str, str] | None = None,
) -> BuildPlan:
    """Decide the build: context, args, base, hash and tags; nothing is built yet."""
    if kind not in KINDS and kind not in SERVICE_KINDS:
        raise UsageError(f"unknown image kind {kind!r}; expected one of {', '.join(KINDS)}")
    folder, dockerfile = SERVICE_KINDS.get(kind, ("", f"Dockerfile.sandbox.{kind}"))
    context = settings.root / CONTEXT_DIR / folder
    if not (context / dockerfile).is_file():
        raise SandboxError(
            f"{context / dockerfile} not found",
            "run from a stigmer-sandbox checkout or set stigmer.project_dir",
        )
    for tag in options.tags:
        if not IMAGE_RE.match(tag):
            raise UsageError(
                f"invalid tag {tag!r}", "use name:tag, lowercase, e.g. stigmer-sandbox-basic:v1.0.0"
            )
    extra_ca = ca.detect(options.ca_cert or settings.ca_cert)
    base, base_args = _base_for(kind, settings, options, watcher, extra_args or {})
    args = {
        **base_args,
        "IMAGE_VERSION": __version__,
        "SOURCE_URL": SOURCE_URL,
        **(extra_args or {}),
        **options.build_args,
    }
    hashed = {k: v for k, v in args.items() if k not in UNHASHED_ARGS}
    files = context_files(context, dockerfile)
    ca_bytes = extra_ca.path.read_bytes() if extra_ca else b""
    inputs = content_hash(
        context,
        files,
        hashed_args=hashed,
        base_id=base.image_id,
        extra_ca=ca_bytes,
        target=options.target,
    )
    args.update(
        {
            "VCS_REF": _git_revision(settings.root),
            "BUILD_DATE": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    args.update(proxy_args(os.environ))
    name = image_name(kind)
    return BuildPlan(
        kind=kind,
        dockerfile=dockerfile,
        context_dir=context,
        files=files,
        build_args=args,
        labels=labels.project_labels(
            kind, inputs=inputs, **({"target": options.target} if options.target else {})
        ),
        tags=options.tags or default_tags(kind, options.target),
        hash_tag=f"{name}:sha-{inputs}",
        inputs=inputs,
        extra_ca=extra_ca,
        base=base,
        options=options,
        record=ImageRecord.of(settings),
    )


def proxy_args(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """Proxy variables of the host, passed to the build (Docker keeps them out of the cache)."""
    found = {}
    for name in PROXY_VARS:
        value = environ.get(name) or environ.get(name.lower())
        if value:
            found[name] = found[name.lower()] = value
    return found


def normalized_entry(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A context entry as git sees it: the builder's COPY cache keys on owner and mode,
    so a clone owned by another user (or made under another umask) would miss it."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    if info.isfile():
        info.mode = 0o755 if info.mode & 0o111 else 0o644
    return info


def context_tar(
    context_dir: Path, files: Iterable[Path], extra_ca: Path | None = None
) -> io.BytesIO:
    """The build context as sent to the builder: `files`, plus the extra CA if any."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in files:
            archive.add(
                path,
                arcname=path.relative_to(context_dir).as_posix(),
                recursive=False,
                filter=normalized_entry,
            )
        if extra_ca:
            archive.add(extra_ca, arcname=CA_CONTEXT_PATH, filter=normalized_entry)
    buffer.seek(0)
    return buffer


def _tag_all(image_id: str, tags: Iterable[str]) -> None:
    api = engine.client().api
    with engine.engine_errors():
        for tag in tags:
            repository, version = split_image(tag)
            api.tag(image_id, repository, version, force=True)


def build(plan: BuildPlan, watcher: BuildWatcher) -> BuildOutcome:
    """Build the plan unless its hash tag exists; tag the result with every requested tag."""
    started = time.monotonic()
    found = engine.image_id(plan.hash_tag)
    if found is not None and not (plan.options.force or plan.options.no_cache):
        image_id, steps, cached, built = found, 0, 0, False
    else:
        image_id, steps, cached = _run_builder(plan, watcher)
        built = True
    _tag_all(image_id, plan.tags)
    return BuildOutcome(
        image_id,
        (*plan.tags, plan.hash_tag),
        int(engine.image(image_id).attrs.get("Size", 0)),
        time.monotonic() - started,
        built,
        steps,
        cached,
    )


def _run_builder(plan: BuildPlan, watcher: BuildWatcher) -> BuilderRun:
    options = plan.options
    repository, tag = split_image(plan.hash_tag)
    return _build_recorded(
        plan.record,
        plan.kind,
        watcher,
        fileobj=context_tar(
            plan.context_dir, plan.files, plan.extra_ca.path if plan.extra_ca else None
        ),
        custom_context=True,
        dockerfile=plan.dockerfile,
        tag=f"{repository}:{tag}",
        buildargs=plan.build_args,
        labels=plan.labels,
        nocache=options.no_cache,
        pull=False,
        target=options.target,
        network_mode=options.network,
    )


def _build_recorded(
    record: ImageRecord | None, kind: str, watcher: BuildWatcher, **request: Any
) -> BuilderRun:
    """Run the builder (`request`: `APIClient.build` arguments) and follow it. Every image
    it produced goes into `record`, a failed build's too: its finished steps stay behind."""
    produced: list[str] = []
    try:
        with engine.engine_errors():
            stream = engine.client().api.build(rm=True, forcerm=True, decode=True, **request)
            return _follow(stream, watcher, produced)
    finally:
        if record is not None:
            _record(record, kind, produced, watcher)


def _record(record: ImageRecord, kind: str, ids: list[str], watcher: BuildWatcher) -> None:
    """Write a build's images into the record; a build stays a success when the record
    cannot be written, only its untagged leftovers are then kept by `inv clean`."""
    try:
        record.add(kind, ids)
    except OSError as exc:
        watcher.note(
            f"could not record the build in {record.path} ({exc.strerror}): "
            "`inv clean` will keep its untagged leftovers"
        )


def _follow(
    stream: Iterator[dict[str, Any]], watcher: BuildWatcher, produced: list[str]
) -> BuilderRun:
    """Consume the build stream, adding to `produced` the id of every image a step made or
    took from the cache; raise `BuildError` naming the step on failure."""
    image_id, total, cached = "", 0, 0
    current = (0, "")
    recent: list[str] = []
    for chunk in stream:
        if "error" in chunk:
            raise _failure(chunk, current, total, recent)
        image_id = chunk.get("aux", {}).get("ID", image_id)
        for text in str(chunk.get("stream", "")).splitlines():
            step = STEP_RE.match(text.strip())
            if step:
                current, total = (int(step.group(1)), step.group(3)), int(step.group(2))
                recent = []
                watcher.step(current[0], total, current[1])
            elif text.strip():
                cached += "Using cache" in text
                produced.extend(STEP_IMAGE_RE.findall(text))
                recent = [*recent[-39:], text]
                watcher.line(text)
    if not image_id:
        raise BuildError("the builder finished without producing an image")
    produced.append(image_id)
    return BuilderRun(image_id, total, cached)


def _failure(
    chunk: dict[str, Any], step: tuple[int, str], total: int, recent: list[str]
) -> BuildError:
    message = str(chunk.get("errorDetail", {}).get("message") or chunk["error"]).strip()
    where = f"step {step[0]}/{total} ({step[1][:80]})" if step[0] else "before the first step"
    return BuildError(
        f"build failed at {where}: {message.splitlines()[0][:300]}",
        diagnose([*recent, message]),
        details=tuple(recent[-15:]),
    )


USER_DOCKERFILE = """\
FROM {image}
USER root
RUN groupmod -o -g {gid} sandbox && usermod -o -u {uid} -g {gid} sandbox \\
    && find / -xdev \\( -uid {image_uid} -o -gid {image_gid} \\) -exec chown -h {uid}:{gid} {{}} +
USER sandbox
"""


def image_for_user(image: str, uid: int, gid: int, record: ImageRecord | None = None) -> str:
    """`image`, or a derived image whose sandbox user has `uid`/`gid` (the user the sandbox
    runs as, `policy.sandbox_user`), so files written into the bind-mounted workspace are
    the host user's. The image's own sandbox user needs no derived image. A build writes
    its images into `record` (the derived image is tagged; a failed build's steps are not).
    """
    if (uid, gid) == (policy.SANDBOX_UID, policy.SANDBOX_GID):
        return image
    base_id = str(engine.image(image).id)
    tag = f"stigmer-sandbox-user:{uid}-{gid}-{base_id.removeprefix('sha256:')[:12]}"
    if engine.image_id(tag):
        return tag
    dockerfile = USER_DOCKERFILE.format(
        image=image, uid=uid, gid=gid, image_uid=policy.SANDBOX_UID, image_gid=policy.SANDBOX_GID
    ).encode()
    _build_recorded(
        record,
        "user",
        SilentWatcher(),
        fileobj=io.BytesIO(dockerfile),
        tag=tag,
        labels=labels.project_labels("user", base=base_id),
    )
    return tag


class SilentWatcher:
    """A build watcher that shows nothing (a failure still raises with the log's tail)."""

    def note(self, text: str) -> None:
        pass

    def step(self, number: int, total: int, instruction: str) -> None:
        pass

    def line(self, text: str) -> None:
        pass


def diagnose(lines: Iterable[str]) -> str | None:
    """A fix for the failure these log lines show, when the cause is recognisable."""
    text = "\n".join(lines).lower()
    for needles, hint in HINTS:
        if any(needle in text for needle in needles):
            return hint
    return None
