"""Webhooks: when an async job ends (processed or failed), its final JSON is POSTed to the URL
its submitter gave, signed, at least once, and only to hosts the operator allows.

- **Signed**: `X-Sam3-Signature: sha256=<hex HMAC-SHA256 of the body>` with the secret in
  `SAM3_VIDEO_WEBHOOK_SECRET` (app arg `webhook_secret_env`); `X-Sam3-Timestamp` is also the
  body's `delivery.timestamp`, so the signature covers it and an old body replayed can be told;
  `X-Sam3-Job-Id` lets a receiver drop a second delivery of the same job.
- **At least once**: a timeout, a refused connection or a non-2xx answer is tried again after
  5 s, then 15, 45, ... (x3, at most an hour apart), `max_attempts` in all. Each attempt is
  written to the job's record before the next is due, so deliveries survive a restart, and
  job.json shows them (`webhook: {attempts, last_status, state}`).
- **Guarded** (SSRF): http and https only, to hosts listed in the app arg `webhook_hosts`. At
  delivery the host is resolved again (DNS can change) and the connection goes to the address
  checked then: a listed name is trusted only while it resolves to public addresses; a
  private, loopback or link-local address must be listed itself. Redirects are never
  followed: a 3xx is a failed attempt.
- **Bounded**: attempts run on a small thread pool of their own, each cut off after
  `timeout_s` however slowly the receiver answers, so a slow or dead receiver costs its retry
  schedule and never holds the runner or the store's threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from serve_app.errors import InvalidJob

log = logging.getLogger("ray.serve")

MAX_URL = 2048
FIRST_RETRY_S, BACKOFF, MAX_DELAY_S = 5.0, 3.0, 3600.0
SIGNATURE, TIMESTAMP, JOB_ID, ATTEMPT = "X-Sam3-Signature", "X-Sam3-Timestamp", "X-Sam3-Job-Id", "X-Sam3-Attempt"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class WebhookSettings:
    """From AppArgs (webhook_hosts, the secret's variable, webhook_max_attempts, webhook_timeout_s)."""

    hosts: tuple[str, ...] = ()
    secret: str = ""
    max_attempts: int = 8
    timeout_s: float = 10.0
    concurrency: int = 4  # attempts at once per replica


class Refused(Exception):
    """The guard refuses this delivery now (host no longer allowed, a disallowed address): final."""


def _ip(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is not the address
    except ValueError:
        return None


def _host(raw: str) -> str:
    return raw.strip().strip("[]").lower().rstrip(".")


class HostGuard:
    """The hosts webhooks may go to: names and IP addresses (AppArgs.webhook_hosts)."""

    def __init__(self, hosts: Iterable[str] = ()) -> None:
        self.names: set[str] = set()
        self.ips: set[Address] = set()
        for host in filter(None, map(_host, hosts)):
            ip = _ip(host)
            if ip is None:
                self.names.add(host)
            else:
                self.ips.add(ip)

    def __bool__(self) -> bool:
        return bool(self.names or self.ips)

    def listed(self) -> str:
        return ", ".join([*sorted(self.names), *sorted(map(str, self.ips))])

    def check(self, url: str) -> None:
        """At submission: InvalidJob (400) unless `url` is http(s) to an allowed host."""
        if not self:
            raise InvalidJob("webhook: this service sends no webhooks; its operator allows no hosts "
                             "(app arg webhook_hosts)")
        if len(url) > MAX_URL:
            raise InvalidJob(f"webhook is {len(url)} characters; the limit is {MAX_URL}")
        shown = url if len(url) <= 80 else url[:77] + "..."
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):  # never into a request line
            raise InvalidJob(f"webhook {shown!r} contains a space or a control character")
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise InvalidJob(f"webhook {shown!r} is not a URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise InvalidJob(f"webhook {shown!r} must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise InvalidJob("webhook must not carry a user name or password; the receiver checks the signature")
        host = _host(parts.hostname or "")
        if not host:
            raise InvalidJob(f"webhook {shown!r} has no host")
        if not self.allows(host):
            raise InvalidJob(f"webhook host {host!r} is not allowed; this service sends webhooks to "
                             f"{self.listed()} (app arg webhook_hosts)")

    def allows(self, host: str) -> bool:
        ip = _ip(host)
        return ip in self.ips if ip is not None else host in self.names

    def address(self, host: str, port: int) -> Address:
        """At delivery: the address to connect to for `host`, resolved and checked now. Refused
        when the host or every address it resolves to is not allowed; OSError when it does not
        resolve (tried again later)."""
        host = _host(host)
        ip = _ip(host)
        if ip is not None:
            if ip in self.ips:
                return ip
            raise Refused(f"{ip} is no longer in webhook_hosts")
        if host not in self.names:
            raise Refused(f"{host} is no longer in webhook_hosts")
        found = [_ip(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        for ip in found:
            if ip is not None and (ip in self.ips or ip.is_global):
                return ip
        raise Refused(f"{host} resolves to {', '.join(map(str, found))}: not a public address, nor one listed in "
                      "webhook_hosts")


def sign(body: bytes, secret: str) -> str:
    """The X-Sam3-Signature value of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def next_delay(attempts: int) -> float:
    """Seconds before attempt `attempts + 1`: 5, 15, 45, ... at most an hour, with 10% jitter so
    that a receiver back from an outage is not hit by every job at once."""
    return min(FIRST_RETRY_S * BACKOFF ** (attempts - 1), MAX_DELAY_S) * random.uniform(0.9, 1.1)


@dataclass(frozen=True)
class Attempt:
    status: int | None      # the receiver's HTTP status; None when none came
    error: str | None       # why it failed; None when delivered
    final: bool = False     # refused by the guard: no point trying again

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _Pinned(http.client.HTTPSConnection):
    """An HTTP(S) connection to the address the guard checked, not to whatever the name resolves
    to by the time it connects; the Host header, SNI and the certificate check keep the name."""

    def __init__(self, host: str, port: int, address: Address, tls: bool, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address, self.tls = str(address), tls

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host) if self.tls else sock

    def abort(self) -> None:
        """From another thread: a receiver past its time is cut off (the blocked read returns)."""
        with contextlib.suppress(OSError, AttributeError):
            self.sock.shutdown(socket.SHUT_RDWR)


class Post:
    """One attempt: POST `body` to `url` through the guard; `run` blocks (on the sender's pool)."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str], guard: HostGuard, timeout_s: float) -> None:
        self.url, self.body, self.headers, self.guard, self.timeout_s = url, body, headers, guard, timeout_s
        self.conn: _Pinned | None = None

    def run(self) -> Attempt:
        parts = urllib.parse.urlsplit(self.url)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        try:
            address = self.guard.address(parts.hostname or "", port)
        except Refused as exc:
            return Attempt(None, f"not sent: {exc}", final=True)
        except OSError as exc:
            return Attempt(None, f"{parts.hostname} did not resolve: {exc.strerror or exc}")
        self.conn = _Pinned(parts.hostname or "", port, address, tls, self.timeout_s)
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        try:
            self.conn.request("POST", path, self.body, self.headers)
            status = self.conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            return Attempt(None, _why(exc, self.timeout_s))
        finally:
            self.conn.close()
        if 200 <= status < 300:
            return Attempt(status, None)
        return Attempt(status, f"the receiver answered {status}" + (" (a redirect: not followed)" if 300 <= status < 400
                                                                     else ""))

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.abort()


def _why(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g} s"
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"[:300]


class WebhookSender:
    """Sends the due webhooks of the shared store from this replica: each attempt is claimed in
    the store first (so two replicas do not send it together) and recorded after.

    `store` is the jobs' AsyncJobStore; `render(row)` the job JSON (api/answers.async_job_json);
    `clock` the store's clock (when attempts are due)."""

    def __init__(self, store: Any, settings: WebhookSettings, render: Callable[[Any], dict],
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.settings, self.render, self.clock = store, settings, render, clock
        self.guard = HostGuard(settings.hosts)
        # A claimed attempt that was never recorded (its replica died) is due again after this.
        self.lease_s = max(60.0, 3 * settings.timeout_s)
        self.pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="webhook")
        self.sending: set[asyncio.Task] = set()

    async def tick(self) -> None:
        """Start the attempts that are due, as many as this replica has room for."""
        room = self.settings.concurrency - len(self.sending)
        if room <= 0 or not self.guard:
            return
        for row in await self.store.due_webhooks(room):
            if await self.store.claim_webhook(row.id, row.webhook_next_at, self.lease_s):
                task = asyncio.get_running_loop().create_task(self.send(row))
                self.sending.add(task)
                task.add_done_callback(self.sending.discard)

    async def send(self, row: Any) -> Attempt:
        attempt_no = row.webhook_attempts + 1
        stamp = int(time.time())
        body = json.dumps({**self.render(row), "delivery": {"attempt": attempt_no, "timestamp": stamp}}).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "sam3-video-webhooks",
                   SIGNATURE: sign(body, self.settings.secret), TIMESTAMP: str(stamp), JOB_ID: row.id,
                   ATTEMPT: str(attempt_no)}
        post = Post(row.webhook_url, body, headers, self.guard, self.settings.timeout_s)
        future = asyncio.get_running_loop().run_in_executor(self.pool, post.run)
        try:
            attempt = await asyncio.wait_for(asyncio.shield(future), self.settings.timeout_s + 1)
        except asyncio.TimeoutError:  # a receiver dripping its answer: cut off, the thread freed
            post.abort()
            attempt = Attempt(None, f"no answer within {self.settings.timeout_s:g} s")
        last = attempt.delivered or attempt.final or attempt_no >= self.settings.max_attempts
        delay = None if last else next_delay(attempt_no)
        await self.store.webhook_attempted(row.id, attempt_no, attempt.status, attempt.error,
                                           None if delay is None else self.clock() + delay)
        if not attempt.delivered:
            log.info("webhook of job %s, attempt %d of %d: %s%s", row.id, attempt_no, self.settings.max_attempts,
                     attempt.error, "" if delay is None else f"; again in {delay:.0f} s")
        return attempt

    async def stop(self) -> None:
        """Attempts in progress end unrecorded: their claim lapses and another runner sends them."""
        for task in list(self.sending):
            task.cancel()
        await asyncio.gather(*self.sending, return_exceptions=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
