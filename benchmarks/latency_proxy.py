"""A TCP proxy that adds a fixed one-way latency, for a database that is not on this host.

    .venv/bin/python benchmarks/latency_proxy.py --target 127.0.0.1:5432 --delay-ms 0.5

Listens on 127.0.0.1 (``--port``, default: a free one, printed on the first line of stdout) and
forwards every chunk ``--delay-ms`` late, in both directions, in order: a round trip through it
costs two delays more, plus the proxy's own scheduling (asyncio timers: on a busy 2-core box a
0.5 ms delay adds 1-2 ms per round trip; the ``floor-raw-pg`` mode's ``+p50`` is the round
trip as measured). It runs as a process of its own, so its work never competes with the
measured process for the GIL. ``publish_latency.py --pg-latency-ms`` starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            at, chunk = await due.get()
            if not chunk:
                break
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(1 << 16):
            due.put_nowait((time.monotonic() + delay, chunk))
    due.put_nowait((0.0, b""))
    with contextlib.suppress(ConnectionError):
        await sender


async def _serve(port: int, target: tuple[str, int], delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*target)
        await asyncio.gather(_pump(client_r, server_w, delay), _pump(server_r, client_w, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--target", default="127.0.0.1:5432", help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.5, help="one-way latency added")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, (host, int(port)), args.delay_ms / 1000))
    sys.exit(0)


if __name__ == "__main__":
    main()
