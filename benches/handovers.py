#!/usr/bin/env python3
"""Drives a fixed number of handovers of one lock among CONNECTIONS
connections, for instruction counts: handovers.py HOST PORT HANDOVERS
CONNECTIONS [--hold-own]. The holder sends unlock and its next lock together,
and the next connection in the queue gets the grant, as in pklock-bench's
contended workload. With --hold-own each connection first takes a lock of its
own and keeps it (hold-and-wait), so that every wait is checked for deadlock
in full."""
import socket
import struct
import sys

host, port, handovers, connections = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
hold_own = sys.argv[5:] == ["--hold-own"]


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


def expect(sock, request_id):
    reply = recv_frame(sock)
    if b'"id":%d' % request_id not in reply or b'"ok"' not in reply:
        raise SystemExit("unexpected reply: %r" % reply)


socks = []
for _ in range(connections):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    socks.append(s)
lock = frame(b'{"command":"lock","id":1,"parameters":{"lockName":"h"}}')
unlock = frame(b'{"command":"unlock","id":2,"parameters":{"lockName":"h"}}')
for i, s in enumerate(socks):
    if hold_own:
        s.sendall(frame(b'{"command":"lock","id":3,"parameters":{"lockName":"h/%d"}}' % i))
        expect(s, 3)
    # A ping behind the lock: its reply says the lock is queued, so that
    # the queue is in the connections' order.
    s.sendall(lock + frame(b'{"command":"ping","id":4}'))
    if i == 0:
        expect(s, 1)
    expect(s, 4)
# The queue is strict FIFO: connection i hands over to connection i + 1.
for step in range(handovers):
    i = step % connections
    socks[i].sendall(unlock + lock)
    expect(socks[i], 2)
    expect(socks[(i + 1) % connections], 1)
