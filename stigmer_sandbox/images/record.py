"""Which images this tool built: what tells our untagged images from a user's.

Labels cannot: an image a user builds `FROM stigmer-sandbox-basic:local` inherits
every label of ours. So each build writes down the id of every image and build
stage it produced (or reused from the cache) as one JSON line in
`<state_dir>/images.jsonl`, and cleanup takes an untagged image for ours only
when its id is written there. A line goes out in a single `write` to a file
opened for appending, so concurrent builds never interleave or lose lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import jsonl
from ..config import Settings
from ..errors import SandboxError

RECORD_FILE = "images.jsonl"
SHORT_ID_LENGTH = 12  # what the classic builder prints, and `docker images` shows


def short_id(image_id: str) -> str:
    """The 12-hex form of an image id (`sha256:` prefix or not): the builder's step output
    names images this way, so the record keeps and compares ids in this form."""
    return image_id.removeprefix("sha256:")[:SHORT_ID_LENGTH].lower()


@dataclass(frozen=True)
class ImageRecord:
    """The append-only record of the images built for one project's state folder."""

    path: Path

    @classmethod
    def of(cls, settings: Settings) -> ImageRecord:
        """The record under the state folder of `settings`."""
        return cls(settings.path("state_dir") / RECORD_FILE)

    def add(self, kind: str, image_ids: Iterable[str]) -> None:
        """Write down the ids of one build (one line, appended atomically)."""
        ids = sorted({short_id(i) for i in image_ids if i})
        if not ids:
            return
        jsonl.append(self.path, {"at": int(time.time()), "kind": kind, "ids": ids}, 0o644)

    def ids(self) -> frozenset[str]:
        """Every recorded id (short form); lines that are not a record are ignored."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return frozenset()
        except OSError as exc:
            raise SandboxError(
                f"cannot read the image record {self.path}: {exc.strerror}",
                "fix its permissions; cleanup needs it to tell this tool's images from yours",
            ) from None
        return frozenset(i for line in text.splitlines() for i in _line_ids(line))


def _line_ids(line: str) -> list[str]:
    try:
        entry = json.loads(line)
    except ValueError:
        return []
    ids = entry.get("ids") if isinstance(entry, dict) else None
    return [short_id(i) for i in ids if isinstance(i, str)] if isinstance(ids, list) else []
