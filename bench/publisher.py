"""A flood publisher for the ingest benchmark, run as its own process:

    python -m bench.publisher DATAFILE HOST PORT QOS [raw|paho]

DATAFILE holds marshal'ed [(topic, payload), ...], encoded beforehand. The publisher connects
(MQTT 3.1.1), prints "ready", waits for a line on stdin, publishes everything as fast as it can,
waits until the last message is written (QoS 0) or acknowledged (QoS 1), and prints one JSON
line {"start", "end", "count"} in time.monotonic() seconds (one clock for every process on Linux).

`raw` (the default) builds every PUBLISH frame before the start and writes them in large chunks,
reading PUBACKs on a second thread: it costs little CPU, so on a 2-core machine the broker and
the consumer under test get the cores. `paho` publishes through paho-mqtt's client (no network
thread; loop() every 256 messages): paho's per-message Python work (about 50 us) makes it the
bottleneck well below 20,000 messages/s, which the benchmark records for comparison.
"""

from __future__ import annotations

import json
import marshal
import socket
import struct
import sys
import threading
import time

WINDOW = 30_000  # QoS 1: at most this many unacknowledged publishes (packet ids are 16 bits)


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: bytes) -> bytes:
    return struct.pack(">H", len(text)) + text


def connect_frame(client_id: str) -> bytes:
    body = _string(b"MQTT") + bytes([4, 0x02]) + struct.pack(">H", 0) + _string(client_id.encode())
    return b"\x10" + _remaining(len(body)) + body


def publish_frame(topic: str, payload: bytes, qos: int, mid: int) -> bytes:
    body = _string(topic.encode()) + (struct.pack(">H", mid) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _remaining(len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        data += chunk
    return data


def raw(messages, host: str, port: int, qos: int) -> dict:
    frames = [publish_frame(t, p, qos, (i % 65535) + 1) for i, (t, p) in enumerate(messages)]
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.sendall(connect_frame(f"bench-pub-{port}-{id(frames)}"))
    if _recv_exact(sock, 4)[:2] != b"\x20\x02":
        raise ConnectionError("no CONNACK")
    acked = 0
    lock = threading.Condition()
    done = threading.Event()

    def reader():
        nonlocal acked
        buf = b""
        while acked < len(frames):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            n = len(buf) // 4  # PUBACK: 40 02 id id
            buf = buf[n * 4:]
            with lock:
                acked += n
                lock.notify_all()
        done.set()

    if qos:
        threading.Thread(target=reader, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    chunk, size = [], 0
    for i, frame in enumerate(frames):
        chunk.append(frame)
        size += len(frame)
        if size >= 1 << 18:
            if qos:
                with lock:
                    lock.wait_for(lambda: i - acked < WINDOW, 60)
            sock.sendall(b"".join(chunk))
            chunk, size = [], 0
    if chunk:
        sock.sendall(b"".join(chunk))
    if qos and not done.wait(600):
        raise TimeoutError(f"only {acked} of {len(frames)} acknowledged")
    end = time.monotonic()
    sock.sendall(b"\xe0\x00")
    sock.close()
    return {"start": start, "end": end, "count": len(frames)}


def with_paho(messages, host: str, port: int, qos: int) -> dict:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    done = threading.Event()
    acked = 0
    total = len(messages)

    def on_publish(client, userdata, mid, reason_code, properties):
        nonlocal acked
        acked += 1
        if acked >= total:
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(host, port, keepalive=60)
    deadline = time.monotonic() + 10
    while not connected.is_set() and time.monotonic() < deadline:
        client.loop(0.1)
    if not connected.is_set():
        raise ConnectionError("could not connect")
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    publish, loop = client.publish, client.loop
    for i, (topic, payload) in enumerate(messages):
        publish(topic, payload, qos=qos)
        if i % 256 == 255:
            loop(0)
    deadline = time.monotonic() + 600
    while not done.is_set() and time.monotonic() < deadline:
        loop(0.05)
    if not done.is_set():
        raise TimeoutError(f"only {acked} of {total} sent")
    end = time.monotonic()
    client.disconnect()
    client.loop(0.1)
    return {"start": start, "end": end, "count": total}


def main(argv: list[str]) -> int:
    path, host, port, qos = argv[0], argv[1], int(argv[2]), int(argv[3])
    mode = argv[4] if len(argv) > 4 else "raw"
    with open(path, "rb") as fh:
        messages = marshal.load(fh)
    try:
        result = (raw if mode == "raw" else with_paho)(messages, host, port, qos)
    except Exception as exc:  # noqa: BLE001 - reported to the benchmark as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
