"""The floor under the collector's ingest: a bare paho-mqtt subscriber, run as its own process:

    python -m bench.baresub HOST PORT [count|decode]

It connects as the collector does (MQTT 5, manual acknowledgement, the report topics at QoS 1;
a fresh session), acknowledges each message in its callback and either only counts it (`count`)
or also decodes it as the collector does (wire.parse_topic, wire.decode_report: `decode`). No
queue, no fleet, no store. It prints "ready" once subscribed; each line read from stdin is
answered with the number of messages so far.
"""

from __future__ import annotations

import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import wire


def main(host: str, port: int, mode: str) -> None:
    counted = [0]
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-baresub-{port}",
                         protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True)
    decode = mode == "decode"

    def on_connect(client, userdata, flags, reason, properties):
        client.subscribe(wire.subscription(kind="report"), qos=1)

    def on_message(client, userdata, message):
        if decode:
            wire.decode_report(message.payload, wire.parse_topic(message.topic)[0])
        counted[0] += 1
        client.ack(message.mid, message.qos)

    client.on_connect = on_connect
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_message = on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    if not subscribed.wait(20):
        print("not subscribed", flush=True)
        return
    print("ready", flush=True)
    for _ in sys.stdin:
        print(counted[0], flush=True)
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "count")
