"""GatewayClient's socket handling against a socket pair: packets read in bulk arrive whole and
in order however the bytes are split; queued packets leave in one send and in order."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator

import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from connectors.mqtt.client import GatewayClient


class Recorder(GatewayClient):
    def __init__(self) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id="test")
        self.seen: list[tuple[int, bytes, int]] = []

    def _packet_handle(self) -> MQTTErrorCode:
        p = self._in_packet
        self.seen.append((p["command"], bytes(p["packet"]), p["remaining_length"]))
        return MQTTErrorCode.MQTT_ERR_SUCCESS


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


@pytest.mark.parametrize("seed", range(20))
def test_packets_arrive_whole_and_in_order_however_the_bytes_are_split(
        seed: int, pair: tuple[socket.socket, socket.socket]) -> None:
    rng = random.Random(seed)
    ours, theirs = pair
    client = Recorder()
    client._sock = ours  # type: ignore[assignment]
    packets = [(rng.choice([0x30, 0x40, 0x50, 0x90, 0xD0]),
                rng.randbytes(rng.choice([0, 2, 3, 127, 128, 300, 20000]))) for _ in range(rng.randint(1, 80))]
    stream = b"".join(bytes([cmd]) + _length(len(body)) + body for cmd, body in packets)
    sent = 0
    while sent < len(stream):
        n = rng.randint(1, 70000)
        theirs.sendall(stream[sent:sent + n])
        sent += n
        while True:  # what the connector does: read again while bytes wait in the buffer
            assert client.read_available(limit=rng.randint(1, 300)) == MQTTErrorCode.MQTT_ERR_SUCCESS
            if not client.buffered():
                break
    assert [(c, body) for c, body, _ in client.seen] == packets
    assert all(length == len(body) for _, body, length in client.seen)


def test_hold_stops_parsing_and_keeps_the_rest(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    client = Recorder()
    client._sock = ours  # type: ignore[assignment]
    theirs.sendall(b"".join(bytes([0x40, 2, 0, i]) for i in range(10)))
    client.read_available(limit=3)
    assert len(client.seen) == 3 and client.buffered()
    client.hold = True
    client.read_available()
    assert len(client.seen) == 3
    client.hold = False
    client.read_available()
    assert [body for _, body, _ in client.seen] == [bytes([0, i]) for i in range(10)]


def test_queued_packets_leave_in_one_send_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    client = GatewayClient(CallbackAPIVersion.VERSION2, client_id="test")
    client._sock = ours  # type: ignore[assignment]
    client.on_socket_register_write = lambda *_: None  # queue only; we write below
    sends = 0
    original = client._sock_send

    def counted(buf: bytes | bytearray) -> int:
        nonlocal sends
        sends += 1
        return original(buf)

    client._sock_send = counted  # type: ignore[method-assign]
    for mid in range(1, 51):
        client._packet_queue(0x40, bytes([0x40, 2, 0, mid]), mid, 1)
    assert client.loop_write() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert sends == 1 and not client.want_write()
    assert theirs.recv(1000) == b"".join(bytes([0x40, 2, 0, mid]) for mid in range(1, 51))
