"""HTTP: /metrics, /healthz, /api/fleet and /api/kits/<kabupaten>/<kecamatan>/<kit>/events.

A WSGI app served by the standard library's threading WSGI server (the one prometheus_client
uses), with optional TLS and basic auth configured like Prometheus exporters' web config.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import ssl
import threading
import time
from urllib.parse import parse_qs
from wsgiref.simple_server import make_server

import msgspec
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from agent import wire
from collector import metrics, rules
from collector.fleet import Fleet, Kit

log = logging.getLogger("ektp.collector.web")


def kit_json(kit: Kit, fleet: Fleet) -> dict:
    kab, kec, kit_name = kit.id
    devices = {}
    for name, entry in sorted(kit.entries.items()):
        doc = msgspec.to_builtins(entry)
        doc["since"] = kit.device_changed.get(name)
        devices[name] = doc
    return {
        "kabupaten": kab,
        "kecamatan": kec,
        "kit": kit_name,
        "kabupaten_name": fleet.display_name(kab),
        "kecamatan_name": fleet.display_name(kab, kec),
        "coordinates": fleet.coords.get((kab, kec)),
        "expected": kit.expected,
        "online": kit.online,
        "ready": kit.ready,
        "status": kit.status,
        "not_ready_because": [] if kit.ready else
        (["offline"] if not kit.online else rules.missing_required(kit.entries, fleet.required)),
        "online_since": kit.online_changed,
        "ready_since": kit.ready_changed,
        "last_report": kit.last_report,
        "agent": {"version": kit.agent_version, "host": kit.host, "os": kit.os, "boot": kit.boot, "seq": kit.seq,
                  "heartbeat": kit.hb, "queued": kit.queued, "dropped": kit.dropped},
        "reports": {"received": kit.reports, "replayed": kit.replayed, "duplicates": kit.duplicates},
        "probes": devices,
    }


class BasicAuth:
    """Checks bcrypt hashes; a good password is remembered briefly since bcrypt is slow on purpose."""

    def __init__(self, users: dict[str, bytes], cache_seconds: float = 60.0):
        self.users = users
        self.cache_seconds = cache_seconds
        self._ok: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        key = hashlib.sha256(hashed + b"\0" + password.encode()).digest()
        now = time.monotonic()
        with self._lock:
            if self._ok.get(key, 0) > now:
                return True
        import bcrypt

        if not bcrypt.checkpw(password.encode(), hashed):
            return False
        with self._lock:
            self._ok[key] = now + self.cache_seconds
        return True


class App:
    def __init__(self, fleet: Fleet, store=None, ingest=None, alerts=None, auth: BasicAuth | None = None):
        self.fleet = fleet
        self.store = store
        self.ingest = ingest
        self.alerts = alerts
        self.auth = auth
        self.exposition = metrics.Exposition(fleet)

    def __call__(self, environ, start_response):
        if self.auth is not None and not self.auth.check(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="ektp-collector"'),
                                                ("Content-Type", "text/plain")])
            return [b"Unauthorized\n"]
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            start_response("200 OK", [("Content-Type", metrics.CONTENT_TYPE)])
            return metrics.exposition(self.exposition, self.ingest, self.alerts)
        if path == "/healthz":
            return self._health(start_response)
        if path == "/api/fleet":
            kits = sorted(self.fleet.snapshot(), key=lambda k: k.id)
            return _json(start_response, {"generated": time.time(), "kits": [kit_json(k, self.fleet) for k in kits]})
        if path.startswith("/api/kits/") and path.endswith("/events"):
            parts = path[len("/api/kits/"):-len("/events")].split("/")
            if len(parts) != 3 or not all(wire.is_slug(p) for p in parts):
                return _json(start_response, {"error": "use /api/kits/<kabupaten>/<kecamatan>/<kit>/events"}, "400")
            kit_id = wire.KitId(*parts)
            if self.fleet.get(kit_id) is None:
                return _json(start_response, {"error": f"unknown kit {kit_id}"}, "404")
            query = parse_qs(environ.get("QUERY_STRING", ""))
            try:
                limit = min(max(int(query.get("limit", ["200"])[0]), 1), 5000)
            except ValueError:
                return _json(start_response, {"error": "limit must be a whole number"}, "400")
            events = self.store.events(kit_id, limit=limit) if self.store else []
            ledger = self.store.ledger(kit_id) if self.store else {}
            return _json(start_response, {"kit": str(kit_id), "events": events, "ledger": ledger})
        if path == "/":
            body = b"ektp-collector: /metrics /healthz /api/fleet /api/kits/<kabupaten>/<kecamatan>/<kit>/events\n"
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [body]
        return _json(start_response, {"error": "not found"}, "404")

    def _health(self, start_response):
        problems = []
        if self.ingest is not None and not self.ingest.connected.is_set():
            problems.append("not connected to the MQTT broker")
        if self.store is not None and not self.store.writable():
            problems.append("the store is not writable")
        status = "503 Service Unavailable" if problems else "200 OK"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [("; ".join(problems) or "ok").encode() + b"\n"]


def _json(start_response, doc, code: str = "200"):
    body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    reason = {"200": "OK", "400": "Bad Request", "404": "Not Found"}[code]
    start_response(f"{code} {reason}", [("Content-Type", "application/json; charset=utf-8"),
                                        ("Content-Length", str(len(body)))])
    return [body]


def serve(app, host: str, port: int, cert: str | None = None, key: str | None = None,
          client_ca: str | None = None):
    """Starts the server on a thread; returns it (shutdown() stops it)."""
    server_class = ThreadingWSGIServer
    if ":" in host:  # an IPv6 address such as ::1 or ::
        server_class = type("ThreadingWSGIServer6", (ThreadingWSGIServer,), {"address_family": socket.AF_INET6})
    server = make_server(host, port, app, server_class=server_class, handler_class=_SilentHandler)
    if cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
