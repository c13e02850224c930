"""`fix-permissions`: the guide's "Permission denied" fixes, done safely.

Ownership is changed by a throwaway helper container that has only
CAP_CHOWN, no network, and nothing but the one folder mounted; `find -P`
never follows a symlink and a symlink's own owner is changed, so no path
can lead outside the folder, whatever the sandbox planted in it.

A hard link is the one way a file inside the folder can be a file outside it
(same inode), so an entry with more than one link (not a folder) is never
changed: it is skipped and named. Each entry is opened without following a
symlink and judged and changed through that one descriptor, so a sandbox
running meanwhile cannot rename a hard link over an entry already judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import engine, labels, policy
from ..config import Settings
from ..errors import SandboxError, UsageError

TARGET = "/target"
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown
# Skipped names shown at most; the count says how many more there are.
SHOWN_SKIPPED = 20
# Reads NUL-separated paths from `find -P`; prints the skipped paths (NUL-terminated), then
# how many entries it changed (or would). Perl is in every Debian image (perl-base is
# essential), C-level calls without a compiler. Entries are opened O_PATH|O_NOFOLLOW (a
# symlink opens as itself); the owner is changed through /proc/self/fd, which names the
# opened inode, or with lchown for a symlink, which never follows it.
JUDGE = r"""
use strict; use warnings;
use Fcntl qw(O_NOFOLLOW :mode);
use POSIX ();
use constant O_PATH => 010000000;  # Linux's value (x86-64, arm64); Fcntl does not export it
my ($uid, $gid, $dry) = @ARGV;
my ($changed, @skipped) = (0);
local $/ = "\0";
while (my $path = <STDIN>) {
    chomp $path;
    sysopen(my $entry, $path, O_PATH | O_NOFOLLOW) or next;  # gone meanwhile
    my @st = stat $entry;
    next if !@st || ($st[4] == $uid && $st[5] == $gid);
    if (!S_ISDIR($st[2]) && $st[3] > 1) { push @skipped, $path; next }
    $changed++;
    next if $dry;
    my $done = S_ISLNK($st[2]) ? POSIX::lchown($uid, $gid, $path)
                               : chown($uid, $gid, "/proc/self/fd/" . fileno($entry));
    warn "$path: $!\n" unless $done;
}
print map({ "$_\0" } @skipped), $changed, "\n";
"""


@dataclass(frozen=True)
class OwnershipChange:
    """What happened (or would happen) to one folder."""

    folder: Path
    entries: int
    problems: str
    # Hard-linked files (more than one link) left as they are, as paths on the host.
    skipped: tuple[Path, ...] = ()

    def skipped_line(self) -> str:
        """The skipped files in one line ('' when none), the first few by name."""
        if not self.skipped:
            return ""
        names = ", ".join(str(path) for path in self.skipped[:SHOWN_SKIPPED])
        more = len(self.skipped) - SHOWN_SKIPPED
        tail = f" and {more} more" if more > 0 else ""
        return (
            f"left {len(self.skipped)} hard-linked files as they are (a hard link may be a "
            f"file outside {self.folder}): {names}{tail}"
        )


def target_owner(to_host: bool, uid: int | None, gid: int | None) -> tuple[int, int]:
    """The owner to give: explicit uid/gid, the host user, or the user the sandbox runs as
    (the host user's ids, or 1000 for a root host user: `policy.sandbox_user`)."""
    default = policy.host_user() if to_host else policy.sandbox_user()
    if uid is not None or gid is not None:
        base = uid if uid is not None else default[0]
        owner = base, gid if gid is not None else base
        if not all(0 <= value <= MAX_ID for value in owner):
            # find reads `-uid -5` as "below 5": a bad id must never reach the script
            raise UsageError(f"--uid/--gid must be between 0 and {MAX_ID}, got {uid}:{gid}")
        return owner
    return default


def helper_command(uid: int, gid: int, dry_run: bool) -> list[str]:
    """The helper container's command: `find -P` lists every entry, JUDGE changes them."""
    walk = 'find -P "$1" -print0 | perl -e "$2" "$3" "$4" "$5"'
    return ["sh", "-c", walk, "sh", TARGET, JUDGE, str(uid), str(gid), str(int(dry_run))]


def parse_output(folder: Path, output: str) -> tuple[int, tuple[Path, ...]]:
    """(entries changed, skipped files as host paths) from the helper's output."""
    *skipped, count = output.split("\0")
    count = count.strip()
    shown = tuple(folder / Path(name).relative_to(TARGET) for name in skipped)
    return (int(count) if count.isdigit() else 0), shown


def _helper_image(settings: Settings) -> str:
    for candidate in (settings.base_image, settings.image):
        if engine.image_id(candidate):
            return candidate
    raise SandboxError(
        "no image to run the helper from",
        "run `inv sandbox.bootstrap-base` or `inv sandbox.build-basic`",
    )


def fix_ownership(settings: Settings, uid: int, gid: int, dry_run: bool) -> list[OwnershipChange]:
    """Give the workspace and logs folders (and everything in them) to uid:gid."""
    from docker.types import Mount

    folders = policy.sandbox_folders(settings)  # every folder checked before any change
    image = _helper_image(settings)
    changes = []
    for folder in folders.values():
        if not folder.is_dir():
            continue
        with engine.engine_errors():
            container = engine.client().containers.run(
                image,
                helper_command(uid, gid, dry_run),
                user="0:0",
                cap_drop=["ALL"],
                cap_add=["CHOWN"],
                security_opt=["no-new-privileges:true"],
                network_mode="none",
                mounts=[Mount(TARGET, str(folder), type="bind")],
                labels=labels.project_labels("helper"),
                detach=True,
            )
            try:
                container.wait(timeout=600)
                out = container.logs(stdout=True, stderr=False).decode(errors="replace")
                err = container.logs(stdout=False, stderr=True).decode(errors="replace").strip()
            finally:
                container.remove(force=True)
        count, skipped = parse_output(folder, out)
        problems = err.splitlines()[0][:160] if err else ""
        changes.append(OwnershipChange(folder, count, problems, skipped))
    return changes
