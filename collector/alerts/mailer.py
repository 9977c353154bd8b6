"""Email delivery: renders due notifications, one message per recipient, over SMTP with retries.

Notifications wait in the store's outbox. Those that fall due for one recipient within the
digest window go out as one digest, so a district-wide outage is one email, not dozens. A send
that fails stays queued and is retried with exponential backoff; a sent one is marked at once
and never sent again.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import threading
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from agent.config import Secret
from agent.logutil import RateLimitedLog
from collector.alerts.engine import AlertEngine, AlertStore
from collector.alerts.render import Renderer
from collector.config import AlertsConfig, SmtpConfig

log = logging.getLogger("ektp.collector.mail")


def build_message(sender: str, recipient: str, subject: str, text: str, html: str,
                  message_id: str | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = message_id or make_msgid(domain=sender.rpartition("@")[2] or "localhost")
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


def send(smtp: SmtpConfig, password: Secret | None, message: EmailMessage) -> None:
    """One delivery attempt; raises smtplib.SMTPException or OSError on failure."""
    context = ssl.create_default_context(cafile=smtp.ca)
    if smtp.security == "tls":
        client = smtplib.SMTP_SSL(smtp.host, smtp.port or 465, timeout=smtp.timeout, context=context)
    else:
        client = smtplib.SMTP(smtp.host, smtp.port or (587 if smtp.security == "starttls" else 25),
                              timeout=smtp.timeout)
    with client:
        client.ehlo()
        if smtp.security == "starttls":
            client.starttls(context=context)
            client.ehlo()
        if smtp.username:
            client.login(smtp.username, password.reveal() if password else "")
        client.send_message(message)


class Mailer:
    def __init__(self, config: AlertsConfig, password: Secret | None, store: AlertStore, renderer: Renderer):
        self.cfg = config
        self.password = password
        self.store = store
        self.renderer = renderer
        self.sent = 0
        self.failures = 0
        self.queued = 0
        self._rlog = RateLimitedLog(log, every=600.0)

    def dispatch(self, now: float) -> int:
        """Sends what is due; returns the number of emails sent."""
        if self.cfg.smtp is None:
            return 0
        sent = 0
        self.queued = self.store.queued()
        for recipient, notes in self.store.due(now).items():
            retrying = any(n["attempts"] for n in notes)
            if not retrying and now - min(n["created"] for n in notes) < self.cfg.digest_window:
                continue  # wait: more may come within the window and join a digest
            subject, text, html = self.renderer.render(notes)
            ids = [n["id"] for n in notes]
            earlier = {n["message_id"] for n in notes}
            if len(earlier) == 1 and "" not in earlier:
                message_id = earlier.pop()  # the same email again: a retry, maybe after a crash
            else:
                message_id = make_msgid(domain=self.cfg.smtp.from_address.rpartition("@")[2] or "localhost")
                self.store.claim_message_id(ids, message_id)
            message = build_message(self.cfg.smtp.from_address, recipient, subject, text, html, message_id)
            try:
                send(self.cfg.smtp, self.password, message)
            except (smtplib.SMTPException, OSError, socket.timeout) as exc:
                self.failures += 1
                retry = self.store.mark_failed(ids, now, f"{type(exc).__name__}: {exc}",
                                               max(n["attempts"] for n in notes))
                self._rlog.warning("smtp", "cannot send email to %s (%s: %s); kept in the outbox, next try in %.0f s",
                                   recipient, type(exc).__name__, exc, retry - now)
                continue
            self.store.mark_sent(ids, now)
            self.sent += 1
            sent += 1
            log.info("sent %r to %s (%d notice%s)", subject, recipient, len(ids), "" if len(ids) == 1 else "s")
        self.queued = self.store.queued()
        return sent


class AlertService:
    """Evaluates alerts and delivers email on its own thread, on the collector's clock."""

    def __init__(self, engine: AlertEngine, mailer: Mailer, every: float, clock=time.time):
        self.engine = engine
        self.mailer = mailer
        self.every = every
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        self.engine.evaluate(self.clock())
        self.mailer.dispatch(self.clock())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - alerting must outlive one bad evaluation
                log.exception("alert evaluation failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
