"""A job's webhook: one signed POST of its final state, to an address the outbound policy allows.

The body is ``{"id", "state"}``; with ``RTPRUNE_WEBHOOK_SECRET`` set it is signed like this, so a receiver
can check that the service sent it and when:

    X-RTPrune-Timestamp: 1764662400
    X-RTPrune-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

A webhook stored while webhooks were on does not fire once they are off (the switch is read when the
job ends), and the address is checked again then (a name may resolve elsewhere since the job began).

Deliveries run on a small pool of their own (receivers that never answer hold only those threads,
never the job store's), and a failed one is tried again after 1, 2 and 4 s — four tries in all — each
with a fresh timestamp and signature, so a receiver that rejects stale timestamps accepts the retry.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from service.outbound import OutboundRefused, Policy, request

log = logging.getLogger(__name__)
WEBHOOK_DEADLINE_S = 10.0
WEBHOOK_THREADS = 4  # deliveries at once; more wait their turn
WEBHOOK_ATTEMPTS = 4


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-RTPrune-Signature`` value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


@dataclass(frozen=True)
class Webhooks:
    enabled: bool
    policy: Policy
    secret: str | None = None
    attempts: int = WEBHOOK_ATTEMPTS
    backoff_s: float = 1.0  # the first retry's wait; each later one waits twice as long
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(WEBHOOK_THREADS, thread_name_prefix="webhook"),
        repr=False,
        compare=False,
    )
    _closing: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def deliver(self, url: str, job_id: str, state: str) -> Future:
        """Send the job's final state on the webhooks' own threads, retrying failures; returns at once."""
        return self._pool.submit(self.send_with_retries, url, job_id, state)

    def send_with_retries(self, url: str, job_id: str, state: str) -> bool:
        for attempt in range(self.attempts):
            if self.send(url, job_id, state):
                return True
            if not self.enabled or attempt + 1 == self.attempts:
                break
            if self._closing.wait(self.backoff_s * 2**attempt):  # the service is stopping: give up
                break
        log.warning("webhook for job %s not delivered after %d tries", job_id, attempt + 1)
        return False

    def close(self) -> None:
        """Stop retrying and let waiting deliveries go (the process is stopping)."""
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def send(self, url: str, job_id: str, state: str) -> bool:
        """POST the job's final state; True if the receiver answered 200. Failures are logged, never raised."""
        if not self.enabled:
            log.info("webhook of job %s not sent: webhooks are off on this server", job_id)
            return False
        body = json.dumps({"id": job_id, "state": state}).encode()
        headers = {"Content-Type": "application/json"}
        if self.secret:
            timestamp = str(int(time.time()))
            headers["X-RTPrune-Timestamp"] = timestamp
            headers["X-RTPrune-Signature"] = signature(self.secret, timestamp, body)
        try:
            limits = {"deadline_s": WEBHOOK_DEADLINE_S, "max_bytes": 65536, "accept": range(200, 300)}
            request(url, self.policy, method="POST", body=body, headers=headers, **limits)
        except OutboundRefused as exc:
            log.warning("webhook for job %s failed: %s", job_id, exc)
            return False
        return True
