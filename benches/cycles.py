#!/usr/bin/env python3
"""Drives a fixed number of lock/unlock cycles against a pklock server, for
instruction counts: cycles.py HOST PORT CYCLES_PER_CONNECTION CONNECTIONS.
Each connection has one request in flight at a time."""
import socket
import struct
import sys

host, port, cycles, connections = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def frame(body):
    return struct.pack(">I", len(body)) + body


def recv_frame(sock):
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise SystemExit("the server closed the connection")
            data += chunk
        return data

    (length,) = struct.unpack(">I", exactly(4))
    return exactly(length)


socks = []
for _ in range(connections):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    socks.append(s)
locks = [frame(b'{"command":"lock","id":1,"parameters":{"lockName":"p/%d"}}' % i) for i in range(connections)]
unlocks = [frame(b'{"command":"unlock","id":2,"parameters":{"lockName":"p/%d"}}' % i) for i in range(connections)]
for _ in range(cycles):
    for s, request in zip(socks, locks):
        s.sendall(request)
    for s in socks:
        recv_frame(s)
    for s, request in zip(socks, unlocks):
        s.sendall(request)
    for s in socks:
        recv_frame(s)
