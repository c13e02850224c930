"""Where a plain `stigmer-sandbox run` finds its warm relay without loading the settings.

Loading the settings (the dataclass, its checks, the project file) and the modules around
them costs more than the command itself on a warm relay. So once a plain run has reached
a relay through its settings, it notes the relay's socket and fingerprint under a key made
of everything those settings are read from: the current folder, the environment variables
that set them (and the engine's), the package's own code, and the size, time and inode of
every configuration file Invoke or the project reads. The next run with the same key goes
straight to that relay; any change of input is another key (the full path then runs and
notes the new one), and a relay that is gone or serves other settings refuses, so the
command takes the full path and nothing ran twice.

The notes live in a folder only this user can enter (0700, checked on each read), like
the relay's socket. Standard library only, and little of it: this runs before anything
else is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

ENV_PREFIXES = ("INVOKE_", "STIGMER_", "DOCKER_")
ENV_NAMES = ("HOME", "XDG_CONFIG_HOME", "TMPDIR")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".py")
CODE_FILES = ("config.py", "relay.py", "warm_index.py")


def folder() -> str:
    """This user's private folder for the notes."""
    base = os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, f"stigmer-sandbox-{os.getuid()}", "warm")


def _stat(path: str) -> list[int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return [found.st_mtime_ns, found.st_size, found.st_ino]


def key(cwd: str | None = None) -> str:
    """The identity of everything a plain run's settings are read from."""
    cwd = os.path.realpath(cwd or os.getcwd())
    environ = sorted(
        (name, value)
        for name, value in os.environ.items()
        if name.startswith(ENV_PREFIXES) or name in ENV_NAMES
    )
    stems = ["/etc/invoke", os.path.expanduser("~/.invoke"), os.path.join(cwd, "invoke")]
    files = [_stat(stem + suffix) for stem in stems for suffix in CONFIG_SUFFIXES]
    here = os.path.dirname(os.path.abspath(__file__))
    code = [_stat(os.path.join(here, name)) for name in CODE_FILES]
    text = json.dumps([cwd, environ, files, code])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _private(path: str) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (
        (info.st_mode & 0o170000) == 0o040000
        and info.st_uid == os.getuid()
        and not (info.st_mode & 0o077)
    )


def lookup(cwd: str | None = None) -> tuple[str, str, float] | None:
    """The relay noted for this key: (socket, fingerprint, default timeout), or None."""
    where = folder()
    if not _private(where):
        return None
    try:
        with open(os.path.join(where, key(cwd) + ".json"), encoding="utf-8") as file:
            found = json.load(file)
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict):
        return None
    socket, fingerprint, timeout = (found.get(k) for k in ("socket", "fingerprint", "timeout"))
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        return None
    if isinstance(socket, str) and isinstance(fingerprint, str):
        return socket, fingerprint, float(timeout)
    return None


def remember(socket_path: str, fingerprint: str, timeout: float, cwd: str | None = None) -> None:
    """Note the relay a plain run reached through its settings (best effort)."""
    where = folder()
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
        if not _private(where):
            return
        entry = {"socket": socket_path, "fingerprint": fingerprint, "timeout": timeout}
        target = os.path.join(where, key(cwd) + ".json")
        temporary = f"{target}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(entry, file)
        os.replace(temporary, target)
    except OSError:
        pass


def forget(cwd: str | None = None) -> None:
    """Drop the note for this key (its relay is gone or serves other settings)."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(folder(), key(cwd) + ".json"))
