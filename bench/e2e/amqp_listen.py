#!/usr/bin/env python3
"""Records the worker's answer to a retrain request, for bench/e2e.sh. Standard library only: a
minimal AMQP 0-9-1 client (no pika on the CI machine, and the management plugin is off).

    amqp_listen.py --vhost V --queue Q --ready-file F --timeout S [--host H --port P --user U --password W]

Declares the contract's exchange `audotics.events` (topic, durable: the worker's own declaration),
an exclusive queue Q bound to `model-ready.*`, `model-rejected.*` and `model-failed.*`, consumes
it, then touches F (the caller publishes only after that: nothing can be missed). The first
message is printed as one JSON line: {"received_at": <unix seconds, float>, "routing_key": ...,
"message_id": ..., "body": <the event>}; exit 0. Exit 1 after S seconds without one, or when the
broker closes the connection or channel (the reason is printed on stderr).
"""

import argparse
import json
import socket
import struct
import sys
import time

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
EXCHANGE = "audotics.events"
KEYS = ("model-ready.*", "model-rejected.*", "model-failed.*")


def shortstr(s):
    b = s.encode()
    return struct.pack("B", len(b)) + b


def longstr(b):
    return struct.pack(">I", len(b)) + b


EMPTY_TABLE = struct.pack(">I", 0)


class Conn:
    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.deadline = time.monotonic() + timeout
        self.buf = b""

    def send_method(self, channel, cls, meth, args=b""):
        payload = struct.pack(">HH", cls, meth) + args
        self.sock.sendall(struct.pack(">BHI", FRAME_METHOD, channel, len(payload)) + payload + bytes([FRAME_END]))

    def _read(self, n):
        while len(self.buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(min(left, 30))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self):
        kind, channel, size = struct.unpack(">BHI", self._read(7))
        payload = self._read(size)
        if self._read(1)[0] != FRAME_END:
            raise ConnectionError("bad frame end")
        return kind, channel, payload

    def method(self, want):
        """Next method frame; fails on Connection.Close / Channel.Close, skips heartbeats."""
        while True:
            kind, _, payload = self.frame()
            if kind == FRAME_HEARTBEAT:
                continue
            if kind != FRAME_METHOD:
                raise ConnectionError(f"unexpected frame type {kind}")
            cls, meth = struct.unpack(">HH", payload[:4])
            if (cls, meth) in ((10, 50), (20, 40)):
                code = struct.unpack(">H", payload[4:6])[0]
                text = payload[7:7 + payload[6]].decode(errors="replace")
                raise ConnectionError(f"broker closed {'connection' if cls == 10 else 'channel'}: {code} {text}")
            if (cls, meth) != want:
                raise ConnectionError(f"expected method {want}, got {(cls, meth)}")
            return payload[4:]


def read_shortstr(b, i):
    n = b[i]
    return b[i + 1:i + 1 + n].decode(), i + 1 + n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5672)
    p.add_argument("--user", default="guest")
    p.add_argument("--password", default="guest")
    p.add_argument("--vhost", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--ready-file", required=True)
    p.add_argument("--timeout", type=float, required=True)
    a = p.parse_args()

    c = Conn(a.host, a.port, a.timeout)
    c.sock.sendall(b"AMQP\x00\x00\x09\x01")
    c.method((10, 10))  # Connection.Start
    c.send_method(0, 10, 11, EMPTY_TABLE + shortstr("PLAIN")
                  + longstr(b"\0" + a.user.encode() + b"\0" + a.password.encode()) + shortstr("en_US"))
    tune = c.method((10, 30))  # Connection.Tune
    channel_max, frame_max, _ = struct.unpack(">HIH", tune[:8])
    c.send_method(0, 10, 31, struct.pack(">HIH", channel_max, frame_max, 0))  # no heartbeats
    c.send_method(0, 10, 40, shortstr(a.vhost) + shortstr("") + b"\x00")
    c.method((10, 41))
    c.send_method(1, 20, 10, shortstr(""))
    c.method((20, 11))
    # exchange.declare: ticket, name, type, bits (passive, durable=1, auto-delete, internal, no-wait), args
    c.send_method(1, 40, 10, struct.pack(">H", 0) + shortstr(EXCHANGE) + shortstr("topic") + b"\x02" + EMPTY_TABLE)
    c.method((40, 11))
    # queue.declare: bits (passive, durable, exclusive=1, auto-delete, no-wait)
    c.send_method(1, 50, 10, struct.pack(">H", 0) + shortstr(a.queue) + b"\x04" + EMPTY_TABLE)
    c.method((50, 11))
    for key in KEYS:
        c.send_method(1, 50, 20, struct.pack(">H", 0) + shortstr(a.queue) + shortstr(EXCHANGE) + shortstr(key)
                      + b"\x00" + EMPTY_TABLE)
        c.method((50, 21))
    # basic.consume: bits (no-local, no-ack=1, exclusive, no-wait)
    c.send_method(1, 60, 20, struct.pack(">H", 0) + shortstr(a.queue) + shortstr("bench-e2e") + b"\x02" + EMPTY_TABLE)
    c.method((60, 21))
    open(a.ready_file, "w").close()

    try:
        deliver = c.method((60, 60))  # Basic.Deliver
        received_at = time.time()
        _, i = read_shortstr(deliver, 0)  # consumer tag
        i += 8 + 1  # delivery tag, redelivered
        _, i = read_shortstr(deliver, i)  # exchange
        routing_key, _ = read_shortstr(deliver, i)
        kind, _, header = c.frame()
        if kind != FRAME_HEADER:
            raise ConnectionError(f"expected a content header, got frame type {kind}")
        size, flags = struct.unpack(">QH", header[4:14])
        message_id, j = None, 14
        # Properties in flag order: content-type, content-encoding, headers, delivery-mode, priority,
        # correlation-id, reply-to, expiration, message-id, ...
        for bit, kind_ in ((15, "s"), (14, "s"), (13, "t"), (12, "o"), (11, "o"), (10, "s"), (9, "s"), (8, "s"), (7, "s")):
            if not flags & (1 << bit):
                continue
            if kind_ == "s":
                value, j = read_shortstr(header, j)
                if bit == 7:
                    message_id = value
            elif kind_ == "t":
                j += 4 + struct.unpack(">I", header[j:j + 4])[0]
            else:
                j += 1
        body = b""
        while len(body) < size:
            kind, _, chunk = c.frame()
            if kind == FRAME_BODY:
                body += chunk
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = body.decode(errors="replace")
        print(json.dumps({"received_at": received_at, "routing_key": routing_key, "message_id": message_id,
                          "body": parsed}), flush=True)
    except TimeoutError:
        print(f"amqp_listen: no event within {a.timeout:.0f} s", file=sys.stderr)
        return 1
    except ConnectionError as e:
        print(f"amqp_listen: {e}", file=sys.stderr)
        return 1
    try:
        c.send_method(0, 10, 50, struct.pack(">H", 200) + shortstr("done") + struct.pack(">HH", 0, 0))
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as e:  # connection refused, vhost missing, timeout while setting up
        print(f"amqp_listen: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
