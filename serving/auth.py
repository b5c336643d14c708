"""Multi-tenant API keys: which tenant holds a bearer key, and which tasks that tenant may use.

The tenants file stores only SHA-256 hex digests of keys, never the keys:

    tenants:
      acme:
        key_sha256: ["<64 hex chars>", ...]
        tasks: [sst2, ag_news]        # or "*" for every task the server holds
        max_concurrent: 8             # optional limits (`serving.types.TenantLimits`; 0 = unlimited)
        tokens_per_minute: 20000
        weight: 1.0                   # share of admissions when tenants contend
        metrics: false                # true: this tenant's keys may read /metrics (an operator)

A presented key is hashed and compared against every stored digest with `hmac.compare_digest`
(no early exit), so timing says nothing about which digest matched or how much of it.

The file is re-read while the server runs, like the prompt store: `KeyRing.reload_if_changed`
(called by `serving.middleware.RequireApiKey` before it checks a key) stats it at most once per
interval and reloads it when its inode, mtime or size changed, so a removed key stops working and
changed limits apply within that interval. A file that no longer reads or parses keeps the last good
keys, with one warning per distinct problem. Replace the file atomically (write, then rename; a
Kubernetes Secret volume does) so a half-written copy is never read. This module
does not know about HTTP status codes or tasks that exist; `serving.api` turns a failed lookup
into 401 and a forbidden task into the same 404 as a missing one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from serving.types import ServingError, TenantLimits
from tuner.schema import ConfigError, read_yaml, validate_name

log = logging.getLogger(__name__)
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Unauthorized(ServingError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


def hash_key(key: str) -> str:
    """The digest the tenants file stores for `key`."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


REQUIRED_KEYS = {"key_sha256", "tasks"}
OPTIONAL_KEYS = {"max_concurrent", "tokens_per_minute", "weight", "metrics"}


@dataclass(frozen=True)
class Tenant:
    name: str
    tasks: frozenset[str] | None  # None = every task
    limits: TenantLimits = TenantLimits()  # enforced by the engine's scheduler
    metrics: bool = False  # may read every series of /metrics (task and tenant names included)

    def may_use(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


ANONYMOUS = Tenant("anonymous", None, metrics=True)  # the only tenant when auth is disabled


def load_keyring(auth: str) -> KeyRing:
    """`auth` from the server config: a tenants file, or `none` (explicitly disabled)."""
    if not auth.strip():
        raise ConfigError(
            "api.auth is not set: give a tenants file (api.auth=PATH, see "
            "configs/serving/tenants.example.yaml) or api.auth=none for local development"
        )
    if auth.strip().lower() == "none":
        return KeyRing.disabled()
    if not Path(auth).is_file():
        raise ConfigError(f"api.auth: tenants file not found: {auth}")
    return KeyRing.from_file(auth)


class KeyRing:
    """Maps bearer keys to tenants. `KeyRing.disabled()` lets every caller in as `ANONYMOUS`."""

    def __init__(
        self,
        digests: list[tuple[str, Tenant]],
        enabled: bool = True,
        source: Path | None = None,
        stamp: tuple[int, int, int] | None = None,
    ):
        self._digests = digests
        self.enabled = enabled
        self.source = source  # the tenants file `reload_if_changed` watches (None: fixed keys)
        self._stamp = stamp  # `_stamp(source)` taken before `digests` were read from it
        self._next_check = 0.0
        self._problem: str | None = None  # the last reload problem logged, so each is logged once

    @classmethod
    def disabled(cls) -> KeyRing:
        log.warning(
            "!!! API authentication is DISABLED (auth: none): anyone who can reach this server "
            "can use every task. Use this for local development only. !!!"
        )
        return cls([], enabled=False)

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        stamp = _stamp(Path(path))  # before reading: a change while it is read is seen next time
        return cls(_read_digests(path), source=Path(path), stamp=stamp)

    def reload_if_changed(self, interval_s: float, now: float | None = None) -> bool:
        """Re-read the tenants file if it changed, looking (one stat) at most every `interval_s`.

        Returns True when new keys replaced the old ones (the caller pushes `tenant_limits()` to the
        engine). A file that is missing, unreadable or invalid keeps the current keys and is logged
        once per distinct problem; it is read again when it changes again.
        """
        now = time.monotonic() if now is None else now
        if self.source is None or now < self._next_check:
            return False
        self._next_check = now + interval_s
        stamp = _stamp(self.source)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            digests = _read_digests(self.source)
        except (ConfigError, OSError) as err:
            problem = str(err) if isinstance(err, ConfigError) else f"{self.source}: {err.strerror or err}"
            if problem != self._problem:
                log.warning("tenants file not reloaded, keeping the last good keys: %s", problem)
                self._problem = problem
            return False
        self._digests, self._problem = digests, None
        log.info("tenants file reloaded: %d tenants", len({t.name for _, t in digests}))
        return True

    def tenant_limits(self) -> dict[str, TenantLimits]:
        """Each tenant's limits by name, for `Engine.set_tenant_limits`."""
        return {tenant.name: tenant.limits for _, tenant in self._digests}

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant for an `Authorization: Bearer <key>` header value, or None."""
        if not self.enabled:
            return ANONYMOUS
        key = _bearer_key(authorization)
        if not key:
            return None
        presented = hash_key(key)
        found = None
        for digest, tenant in self._digests:  # always the full scan: constant time in the match position
            if hmac.compare_digest(digest, presented):
                found = tenant
        return found

    def check(self, authorization: str | None) -> Tenant:
        """Like `authenticate`, but a missing or wrong key raises `Unauthorized` (401)."""
        tenant = self.authenticate(authorization)
        if tenant is not None:
            return tenant
        if not _bearer_key(authorization):
            raise Unauthorized("Missing API key: send it as `Authorization: Bearer <key>`.")
        raise Unauthorized("Invalid API key.")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file: (inode, mtime, size), following symlinks; None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read_digests(path: str | Path) -> list[tuple[str, Tenant]]:
    """Every (key digest, tenant) of a tenants file; a problem is a ConfigError naming the file."""
    data = read_yaml(path)
    unknown = sorted(set(data) - {"tenants"})
    if unknown or not isinstance(data.get("tenants"), dict) or not data["tenants"]:
        raise ConfigError(
            f"{path}: expected one top-level key `tenants` mapping tenant names to "
            f"{{key_sha256: [...], tasks: [...] or '*'}}"
        )
    digests: list[tuple[str, Tenant]] = []
    seen: set[str] = set()
    for name, entry in data["tenants"].items():
        tenant = _parse_tenant(path, str(name), entry)
        for digest in entry["key_sha256"]:
            digest = str(digest).strip().lower()
            if not _HEX64.fullmatch(digest):
                raise ConfigError(
                    f"{path}: tenant {name!r}: {digest[:12]!r}... is not a SHA-256 hex digest "
                    f"(store hashlib.sha256(key).hexdigest(), never the key)"
                )
            if digest in seen:
                raise ConfigError(f"{path}: the same key digest appears twice (tenant {name!r})")
            seen.add(digest)
            digests.append((digest, tenant))
    return digests


def _parse_tenant(path, name: str, entry) -> Tenant:
    validate_name("tenant name", name)
    if (
        not isinstance(entry, dict)
        or not REQUIRED_KEYS <= set(entry)
        or not set(entry) <= REQUIRED_KEYS | OPTIONAL_KEYS
    ):
        raise ConfigError(
            f"{path}: tenant {name!r} needs the keys key_sha256 and tasks, and may have "
            f"{', '.join(sorted(OPTIONAL_KEYS))}"
        )
    if not isinstance(entry["key_sha256"], list) or not entry["key_sha256"]:
        raise ConfigError(f"{path}: tenant {name!r}: key_sha256 must be a non-empty list of digests")
    limits = _parse_limits(path, name, entry)
    metrics = entry.get("metrics", False)
    if not isinstance(metrics, bool):
        raise ConfigError(f"{path}: tenant {name!r}: metrics must be true or false")
    tasks = entry["tasks"]
    if tasks == "*":
        return Tenant(name, None, limits, metrics)
    if not isinstance(tasks, list):
        raise ConfigError(f"{path}: tenant {name!r}: tasks must be a list of task names or '*'")
    return Tenant(name, frozenset(validate_name("task name", str(t)) for t in tasks), limits, metrics)


def _parse_limits(path, name: str, entry: dict) -> TenantLimits:
    values = {}
    for key in ("max_concurrent", "tokens_per_minute"):
        value = entry.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{path}: tenant {name!r}: {key} must be an integer >= 0 (0 = unlimited)")
        values[key] = value
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
        raise ConfigError(f"{path}: tenant {name!r}: weight must be a number > 0")
    return TenantLimits(values["max_concurrent"], values["tokens_per_minute"], float(weight))


def _bearer_key(authorization: str | None) -> str:
    if not authorization:
        return ""
    scheme, _, key = authorization.strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""
