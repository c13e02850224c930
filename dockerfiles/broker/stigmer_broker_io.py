"""Bigger socket reads for the broker's mitmproxy (11.0.2, pinned).

mitmproxy reads each connection 65535 bytes at a time, and every read makes one pass
through its Python layer stack: most of the broker's CPU on a large download. Asked for
65535, an asyncio stream reader here reads up to 256 KiB (with a 1 MiB buffer limit), so
a 10 MB response takes a quarter of the passes. Measured through the gateway's chain on
2 cores: 10 MB at about 0.38x the spliced (uninspected) throughput instead of 0.25x.
Loaded as a script before the addon (`-s`); re-check on any mitmproxy upgrade.
"""

import asyncio

READ_SIZE = 256 * 1024
BUFFER_LIMIT = 1024 * 1024
MITMPROXY_READ = 65535  # mitmproxy/proxy/server.py's read size

_read = asyncio.StreamReader.read
_init = asyncio.StreamReader.__init__


async def _bigger_read(self: asyncio.StreamReader, n: int = -1) -> bytes:
    return await _read(self, READ_SIZE if n == MITMPROXY_READ else n)


def _bigger_buffer(
    self: asyncio.StreamReader, limit: int = BUFFER_LIMIT, loop: object = None
) -> None:
    _init(self, limit=max(limit, BUFFER_LIMIT), loop=loop)


asyncio.StreamReader.read = _bigger_read  # type: ignore[method-assign]
asyncio.StreamReader.__init__ = _bigger_buffer  # type: ignore[method-assign]
