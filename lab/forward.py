"""A TCP port of 127.0.0.1 forwarded to an address inside a network namespace.

    python -m lab.forward --netns /run/netns/NAME --listen 127.0.0.1:8443 \\
        --to 198.18.0.11:8080 --port-file FILE

The lab's nodes live in network namespaces of their own that the machine
cannot route to; this is how the machine's own curl and ``jobgate`` reach the
scheduler's API. Each connection accepted on the listening socket (in the
machine's namespace) gets a connection to ``--to`` made from inside the
namespace, and bytes are copied both ways until both sides are done. TLS goes
through untouched: clients verify the scheduler's certificate themselves.

``--listen`` with port 0 takes a port the kernel picks; the port is written
to ``--port-file`` once the socket listens. ``--listen-fd`` serves a socket
the caller made and handed over (``make lab`` does, to report a port in use
at once).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT_S = 10.0


def connect_in_netns(netns: str, address: tuple[str, int]) -> socket.socket:
    """A TCP connection made from inside ``netns``, by this thread.

    setns() changes the calling thread's namespace only, so this is called on
    a thread of its own; the socket keeps the namespace it was made in.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(netns, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)
    sock = socket.create_connection(address, CONNECT_TIMEOUT_S)
    sock.settimeout(None)
    return sock


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends, then end ``dst``'s sending side."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def relay(client: socket.socket, netns: str, target: tuple[str, int]) -> None:
    """Serve one accepted connection (on a thread of its own)."""
    with client:
        try:
            upstream = connect_in_netns(netns, target)
        except OSError as exc:
            print(f"cannot reach {target[0]}:{target[1]}: {exc}", flush=True)
            return
        with upstream:
            back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
            back.start()
            pump(client, upstream)
            back.join()


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.forward")
    parser.add_argument("--netns", required=True, help="/run/netns/NAME")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--listen", type=address, default=("127.0.0.1", 0))
    where.add_argument(
        "--listen-fd", type=int, help="a listening socket handed over by the caller"
    )
    parser.add_argument("--to", type=address, required=True)
    parser.add_argument("--port-file", type=Path)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    else:
        listener = socket.create_server(args.listen)
    host, port = listener.getsockname()[:2]
    if args.port_file:
        partial = Path(f"{args.port_file}.partial")
        partial.write_text(f"{port}\n")
        os.replace(partial, args.port_file)
    print(
        f"forwarding {host}:{port} to {args.to[0]}:{args.to[1]} in {args.netns}",
        flush=True,
    )
    with listener:
        while True:
            client, _ = listener.accept()
            threading.Thread(
                target=relay, args=(client, args.netns, args.to), daemon=True
            ).start()


if __name__ == "__main__":
    sys.exit(main())
