"""A command's output written to the terminal as it comes: the part of `console` that the
warm `stigmer-sandbox run` needs, without the rest of it (colour, tables) to import."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def stream_writer(stream: Any) -> Callable[[bytes], None]:
    """A command's output callback writing its bytes to `stream` as they come."""

    def write(data: bytes) -> None:
        stream.buffer.write(data)
        stream.buffer.flush()

    return write
