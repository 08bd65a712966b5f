"""Listening sockets, bound once: by the single-process server, or by the supervisor for its front-ends."""

from __future__ import annotations

import socket


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; every front-end process accepts from this one queue (the kernel wakes an idle one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def reserve_shared_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Hold `port` (0: a free one) for front-ends that bind it with SO_REUSEPORT (gRPC cannot adopt a socket).

    First a plain bind, so that a port some other program holds fails here as it would for HTTP; then a
    bound, never-listening SO_REUSEPORT socket keeps the port ours while front-ends come and go.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, port))
        port = probe.getsockname()[1]
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))
    return holder, port
