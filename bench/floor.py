"""The floor: a bare trio server with omkd's framing that answers a canned reply.

It splits the byte stream into frames with omkd's own sans-IO ``FrameDecoder`` and answers
every frame with the same reply, without parsing, dispatching or storing anything: what a
round trip over a Unix socket costs a trio server, and so the least any omkd call can cost.
One task per connection (no reader/worker/writer split), like the simplest echo server.

Run: ``python -m bench.floor SOCKET_PATH`` (until SIGTERM or SIGINT).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Final

import trio

from omkd.rpc.framing import NEED_DATA, FrameDecoder, Framing, encode_frame

CANNED_REPLY: Final = encode_frame(Framing.LENGTH, b'{"jsonrpc":"2.0","result":"pong","id":1}')
RECEIVE_BYTES: Final = 64 * 1024
MAX_MESSAGE_BYTES: Final = 1 << 30
BACKLOG: Final = 512


async def serve_floor_connection(stream: trio.SocketStream) -> None:
    """Answer every frame on ``stream`` with the canned reply until the peer leaves."""
    decoder = FrameDecoder(MAX_MESSAGE_BYTES)
    async with stream:
        while True:
            try:
                data = await stream.receive_some(RECEIVE_BYTES)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            decoder.receive_data(data)
            replies = 0
            while decoder.next_message() is not NEED_DATA:
                replies += 1
            if replies:
                try:
                    await stream.send_all(CANNED_REPLY * replies)
                except trio.BrokenResourceError:
                    return


async def serve_floor(path: Path) -> None:
    """Listen on ``path`` (bound under a temporary name, then renamed) until cancelled."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    await sock.bind(str(temporary))
    sock.listen(BACKLOG)
    os.rename(temporary, path)
    listener = trio.SocketListener(sock)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve_floor_connection, [listener])
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    path.unlink(missing_ok=True)


def main() -> None:
    trio.run(serve_floor, Path(sys.argv[1]))


if __name__ == "__main__":
    main()
