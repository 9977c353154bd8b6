"""The running collector: ingest -> fleet -> (store, metrics, HTTP), wired from a loaded config."""

from __future__ import annotations

import logging
import signal
import threading
import time

from agent import wire
from collector.alerts.engine import AlertEngine, AlertStore
from collector.alerts.mailer import AlertService, Mailer
from collector.alerts.render import Renderer
from collector.config import LoadedCollectorConfig
from collector.fleet import Fleet
from collector.ingest import Ingest
from collector.store import Store
from collector.web import App, BasicAuth, serve

log = logging.getLogger("ektp.collector")


class Collector:
    def __init__(self, config: LoadedCollectorConfig, clock=time.time):
        self.config = config
        self.clock = clock
        self.fleet = Fleet(config.raw)
        self.store = Store(config.store_path)
        restored = 0
        for kit_id, record, ledgers in self.store.load_kits():
            self.fleet.restore(kit_id, record, ledgers)
            restored += 1
        if restored:
            log.info("restored the state of %d kits from %s", restored, config.store_path)
        self.ingest = Ingest(config, self.fleet, self.store, clock=clock)
        auth = BasicAuth(config.basic_auth) if config.basic_auth else None
        alerts = config.raw.alerts
        self.alert_store = AlertStore(config.store_path)
        self.alert_engine = AlertEngine(alerts, self.fleet, self.alert_store, clock(),
                                        deliver=alerts.smtp is not None)
        self.mailer = Mailer(alerts, config.smtp_password, self.alert_store,
                             Renderer(alerts.language, alerts.timezone, alerts.templates_dir))
        self.alerts = AlertService(self.alert_engine, self.mailer, alerts.evaluate_every, clock)
        self.app = App(self.fleet, store=self.store, ingest=self.ingest, alerts=(self.alert_engine, self.mailer),
                       auth=auth)
        self.server = None
        self.stop_event = threading.Event()

    def start(self) -> None:
        self.server = serve(self.app, self.config.listen_host, self.config.listen_port,
                            self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca)
        scheme = "https" if self.config.tls_cert else "http"
        log.info("serving %s://%s:%d/metrics; subscribing to %s", scheme, self.config.listen_host,
                 self.server.server_port, ", ".join(self.ingest.topics()))
        self.ingest.start()
        self.alerts.start()
        if self.config.raw.alerts.smtp is None:
            log.info("no alerts.smtp configured: alerts are tracked but no email is sent")

    @property
    def port(self) -> int:
        return self.server.server_port

    def run(self) -> None:
        self.start()
        try:
            self.stop_event.wait()
        finally:
            self.close()

    def close(self) -> None:
        self.alerts.stop()
        self.ingest.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self.store.close()
        self.alert_store.close()
        log.info("collector stopped")

    def stop(self) -> None:
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        for name in ("SIGTERM", "SIGINT"):
            signal.signal(getattr(signal, name), lambda *_: self.stop())


__all__ = ["Collector", "wire"]
