"""The daemon's certificates over time: reload on SIGHUP, expiry warnings and metrics.

:class:`IdentityKeeper` holds what ``dxa serve`` loaded (certificate, key, CA and the
revocation list, ``--crl``).  :meth:`IdentityKeeper.reload` reads the files again and,
when they make a working TLS context, hands it to the Server (new handshakes use it;
connections and transfers already running keep theirs); a broken file is logged and the
old context stays.  :meth:`IdentityKeeper.check_expiry` logs a warning for a
certificate that expires within ``warn_days`` (at start, after each reload and once a
day, :meth:`run`) and updates ``dxa_certificate_expiry_seconds``.

Clients (``dxa cp``, the daemon's own transfer jobs) build their TLS context from the
files on every connection, so a renewed node.pem is theirs on the next connection.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from collections.abc import Callable

from agent.errors import ConfigError
from agent.store.pki import Identity, cert_expiry

__all__ = ["IdentityKeeper", "WARN_DAYS"]

log = logging.getLogger(__name__)

WARN_DAYS = 30
"""A certificate that expires within this many days is warned about."""


class IdentityKeeper:
    """``load()`` returns the Identity to use now (re-reading any settings); ``server`` has
    ``reload_tls(identity)``; ``metrics`` (optional) has ``set_certificate_expiry``."""

    def __init__(self, identity: Identity, load: Callable[[], Identity], server, metrics=None,
                 warn_days: float = WARN_DAYS, interval: float = 86400.0) -> None:
        self.identity = identity
        self._load = load
        self.server = server
        self.metrics = metrics
        self.warn_days = warn_days
        self.interval = interval
        self.reloads = 0

    def reload(self) -> bool:
        """Re-read the identity (SIGHUP); True if the server now uses the new one."""
        try:
            identity = self._load()
            self.server.reload_tls(identity)
        except ConfigError as exc:
            log.error("reload refused, keeping the certificate in use: %s", exc)
            return False
        self.identity = identity
        self.reloads += 1
        log.info("reloaded the certificate %s (node %s), CA %s%s", identity.cert, identity.name, identity.ca_cert,
                 f", revocation list {identity.crl}" if identity.crl else "")
        self.check_expiry()
        return True

    def check_expiry(self, now: _dt.datetime | None = None) -> dict[str, float]:
        """Warn about certificates that expire soon; their expiry times (Unix seconds)."""
        now = now or _dt.datetime.now(_dt.timezone.utc)
        expiry: dict[str, float] = {}
        for which, path in (("node", self.identity.cert), ("ca", self.identity.ca_cert)):
            try:
                at = cert_expiry(path)
            except ConfigError as exc:
                log.warning("cannot read the %s certificate: %s", which, exc)
                continue
            expiry[which] = at.timestamp()
            left = at - now
            if left.total_seconds() <= 0:
                log.error("the %s certificate %s expired on %s: handshakes fail", which, path, at.isoformat())
            elif left <= _dt.timedelta(days=self.warn_days):
                log.warning("the %s certificate %s expires in %.1f days (%s): renew it (dxa init --renew, or "
                            "--csr/--sign) and send SIGHUP", which, path, left.total_seconds() / 86400,
                            at.isoformat())
        if self.metrics is not None:
            self.metrics.set_certificate_expiry(expiry)
        return expiry

    async def run(self) -> None:
        """Check now, then every ``interval`` (a day) until cancelled."""
        while True:
            self.check_expiry()
            await asyncio.sleep(self.interval)
