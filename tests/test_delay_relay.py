"""benchmarks.delay_relay, the RTT of the shaped-link benchmark: every byte arrives, in order, no sooner than its
delay, both ways, and a close on one side reaches the other."""

from __future__ import annotations

import os
import socket
import threading
import time

from benchmarks.relay_cost import Relay, byte_echo

DELAY_US = 2000  # each way: far above loopback's own round trip, so the bound below is the relay's


def test_bytes_arrive_whole_in_order_and_a_close_passes_through():
    relay = Relay(byte_echo(), 2 * DELAY_US)
    try:
        payload = os.urandom(24 << 20)  # many pipe-fulls, in pieces of any size the kernel picks
        with socket.create_connection(("127.0.0.1", relay.port), timeout=60) as conn:
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                chunk = conn.recv(1 << 20)
                assert chunk, f"closed after {len(got)} of {len(payload)} bytes"
                got += chunk
            sender.join(60)
            assert bytes(got) == payload
            conn.shutdown(socket.SHUT_WR)  # our close reaches the echo, whose close comes back
            assert conn.recv(1) == b""
    finally:
        relay.close()


def test_a_round_trip_takes_at_least_the_delay_both_ways():
    relay = Relay(byte_echo(), 2 * DELAY_US)
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(20):
                start = time.perf_counter()
                conn.sendall(b"x")
                assert conn.recv(1) == b"x"
                # The writer never sends a piece before its due time (read time + delay), each way.
                assert time.perf_counter() - start >= 2 * DELAY_US / 1e6
    finally:
        relay.close()
