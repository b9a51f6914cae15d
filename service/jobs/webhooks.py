"""A job's webhook: one signed POST of its final state, to an address the outbound policy allows.

The body is ``{"id", "state"}``; with ``RTPRUNE_WEBHOOK_SECRET`` set it is signed like this, so a receiver
can check that the service sent it and when:

    X-RTPrune-Timestamp: 1764662400
    X-RTPrune-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

A webhook stored while webhooks were on does not fire once they are off (the switch is read when the
job ends), and the address is checked again then (a name may resolve elsewhere since the job began).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from service.outbound import OutboundRefused, Policy, request

log = logging.getLogger(__name__)
WEBHOOK_DEADLINE_S = 10.0


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-RTPrune-Signature`` value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


@dataclass(frozen=True)
class Webhooks:
    enabled: bool
    policy: Policy
    secret: str | None = None

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
