"""Settings read from the environment (names and defaults in README)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from server.redis_cluster import ClusterAddress, is_cluster

# Published with the code: anyone could sign tokens and KYC webhooks with
# them. ``serve`` uses them only on the embedded dev stack (or when a
# harness that starts one passes them on, see ``dev_secrets``).
DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-in-production"
DEV_KYC_SECRET = "dev-only-kyc-webhook-secret-change-me-in-production"
SECRETS = ("JWT_SECRET", "KYC_WEBHOOK_SECRET")
# HMAC-SHA256 keys: shorter than the hash, a secret is easier to guess than
# the signature it makes.
MIN_SECRET_BYTES = 32
# Where a server that uses the public development secrets listens unless
# HOST says otherwise: anyone who can reach it could sign tokens.
DEV_HOST = "127.0.0.1"
# Where `make demo` writes the browser demo, in this checkout.
DEFAULT_DEMO_DIR = str(Path(__file__).resolve().parents[1] / "clients" / "ts" / "demo" / "dist")


def dev_secrets() -> dict[str, str]:
    """Environment for a server on the embedded dev stack: the secrets set
    in this environment, else the development ones."""
    return {
        "JWT_SECRET": os.environ.get("JWT_SECRET") or DEV_JWT_SECRET,
        "KYC_WEBHOOK_SECRET": os.environ.get("KYC_WEBHOOK_SECRET") or DEV_KYC_SECRET,
    }


class ConfigError(ValueError):
    """A setting that does not parse; its message names the variable."""


def _parsed(name: str, default: object, parse):
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return parse(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a valid {parse.__name__}") from None


LOG_FORMATS = ("json", "text")


def log_format() -> str:
    """``LOG_FORMAT``: read on its own too, since logging is set up before
    the rest of the settings are."""
    text = os.environ.get("LOG_FORMAT", "json").strip().lower()
    if text not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT={text!r} is not one of {', '.join(LOG_FORMATS)}")
    return text


def _port(name: str, default: int) -> int:
    port = _int(name, default)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}={port} is not a port (0 to 65535)")
    return port


def _int(name: str, default: int) -> int:
    return _parsed(name, default, int)


def _float(name: str, default: float) -> float:
    return _parsed(name, default, float)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(name: str) -> tuple[Network, ...]:
    """Comma-separated IP addresses or CIDR ranges."""
    def networks(text: str) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())

    return _parsed(name, (), networks)


def _demo_dir(name: str) -> str:
    """A directory, or empty for no demo. A directory that does not exist
    yet is allowed (the demo is built later, ``GET /demo`` says so until
    then); a file is a mistake."""
    text = os.environ.get(name, DEFAULT_DEMO_DIR).strip()
    if text and Path(text).exists() and not Path(text).is_dir():
        raise ConfigError(f"{name}={text!r} is not a directory")
    return text
PUSH_RETRY_MAX_S = 300.0


def _push_settings() -> dict[str, object]:
    """The push hook's settings, checked together: a URL needs a secret
    long enough to sign with."""
    url = os.environ.get("PUSH_WEBHOOK_URL", "").strip() or None
    secret = os.environ.get("PUSH_WEBHOOK_SECRET", "")
    base = _float("PUSH_RETRY_BASE_S", Config.push_retry_base_s)
    if url is not None:
        parts = urlsplit(url)
        try:
            parts.port  # a port that is not a number raises here
        except ValueError:
            parts = parts._replace(scheme="")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"PUSH_WEBHOOK_URL={url!r} is not an http or https URL")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            # The receiver trusts what this signs: a short key could be found
            # from one captured push.
            raise ConfigError(f"PUSH_WEBHOOK_SECRET must be set, at least {MIN_SECRET_BYTES} bytes, "
                              "when PUSH_WEBHOOK_URL is set")
    if not 0 < base <= PUSH_RETRY_MAX_S:
        raise ConfigError(f"PUSH_RETRY_BASE_S={base!r} must be more than 0 and at most {PUSH_RETRY_MAX_S:g}")
    return {"push_webhook_url": url, "push_webhook_secret": secret, "push_retry_base_s": base}


@dataclass(frozen=True)
class Config:
    database_url: str | None = None
    replica_urls: tuple[str, ...] = ()
    redis_url: str = "redis://127.0.0.1:6379/0"
    jwt_secret: str = DEV_JWT_SECRET
    kyc_webhook_secret: str = DEV_KYC_SECRET
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    settlement_interval_s: float = 30.0
    access_token_ttl_s: int = 900
    refresh_token_ttl_s: int = 30 * 24 * 3600
    auth_expiring_lead_s: int = 60
    max_frame_bytes: int = 65536
    max_in_flight: int = 32
    ping_interval_s: float = 20.0
    outgoing_queue_max_bytes: int = 1048576
    # The kernel's send buffer of each socket (Linux doubles it); 0 leaves
    # the kernel's own sizing, which lets a peer that does not read hold
    # megabytes of this process's memory beyond the queue bound.
    socket_send_buffer_bytes: int = 262144
    login_max_failures: int = 5
    login_window_s: int = 60
    max_bad_frames: int = 10
    shutdown_grace_s: float = 10.0
    db_pool_min: int = 2
    db_pool_max: int = 20
    db_statement_cache_size: int = 100
    db_command_timeout_s: float = 5.0
    replica_max_lag_bytes: int = 16 * 1024 * 1024
    replica_check_interval_s: float = 0.5
    ryw_ttl_s: int = 60
    redis_timeout_s: float = 2.0
    redis_probe_interval_s: float = 0.5
    # How long binding a socket to a user waits for Redis to confirm the
    # user's channel. Past it the socket is bound anyway, and the
    # subscription is made when Redis answers (server/binding.py).
    subscribe_wait_s: float = 2.0
    # The edge: what a client the server has never seen may hold or cost
    # (docs/security.md says what each protects and how to tune it).
    auth_deadline_s: float = 10.0
    max_sockets_per_address: int = 256
    max_sockets: int = 15000
    trusted_proxies: tuple[Network, ...] = ()
    max_frame_values: int = 1024
    max_frame_depth: int = 16
    auth_max_per_address: int = 20
    auth_address_window_s: int = 60
    hash_concurrency: int = os.cpu_count() or 1
    hash_max_wait_s: float = 2.0
    session_max_age_s: int = 90 * 24 * 3600
    session_cleanup_interval_s: float = 600.0
    # How long user events are kept for events.resume (the contract: at least 7 days).
    event_retention_s: int = 7 * 24 * 3600
    # Bearer token the metrics port asks for; empty = it asks for none
    # (it listens on loopback unless METRICS_HOST says otherwise).
    ops_token: str = ""
    # Prometheus /metrics and the operators' /status (server/metrics_http.py); 0 = none.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    log_format: str = "json"
    # The built browser demo served at GET /demo; empty = not served.
    demo_dir: str = DEFAULT_DEMO_DIR
    # Presence (server/presence.py): how long a user with no authenticated
    # socket left stays online (the contract's 5 s), how long a process's
    # heartbeat key lives (a killed process's sockets count until it is
    # gone: at most 60 s by the contract), how often it is renewed, and how
    # often each process looks for users to take offline.
    presence_offline_after_s: float = 5.0
    presence_ttl_s: float = 30.0
    presence_heartbeat_s: float = 10.0
    presence_sweep_interval_s: float = 1.0
    # The push hook (server/push.py): None = off.
    push_webhook_url: str | None = None
    push_webhook_secret: str = ""
    # The first retry's delay; each next one doubles, up to PUSH_RETRY_MAX_S.
    push_retry_base_s: float = 2.0

    @classmethod
    def from_env(cls) -> "Config":
        replicas = os.environ.get("DATABASE_REPLICA_URLS", "")
        jwt_secret = os.environ.get("JWT_SECRET", "")
        kyc_webhook_secret = os.environ.get("KYC_WEBHOOK_SECRET", "")
        public = jwt_secret == DEV_JWT_SECRET or kyc_webhook_secret == DEV_KYC_SECRET
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            replica_urls=tuple(u.strip() for u in replicas.split(",") if u.strip()),
            redis_url=os.environ.get("REDIS_URL", cls.redis_url),
            jwt_secret=jwt_secret,
            kyc_webhook_secret=kyc_webhook_secret,
            host=os.environ.get("HOST", DEV_HOST if public else cls.host),
            port=_int("PORT", cls.port),
            workers=_int("WORKERS", cls.workers),
            settlement_interval_s=_float("SETTLEMENT_INTERVAL_S", cls.settlement_interval_s),
            access_token_ttl_s=_int("ACCESS_TOKEN_TTL_S", cls.access_token_ttl_s),
            refresh_token_ttl_s=_int("REFRESH_TOKEN_TTL_S", cls.refresh_token_ttl_s),
            auth_expiring_lead_s=_int("AUTH_EXPIRING_LEAD_S", cls.auth_expiring_lead_s),
            max_frame_bytes=_int("MAX_FRAME_BYTES", cls.max_frame_bytes),
            max_in_flight=_int("MAX_IN_FLIGHT", cls.max_in_flight),
            ping_interval_s=_float("PING_INTERVAL_S", cls.ping_interval_s),
            outgoing_queue_max_bytes=_int("OUTGOING_QUEUE_MAX_BYTES", cls.outgoing_queue_max_bytes),
            socket_send_buffer_bytes=_int("SOCKET_SEND_BUFFER_BYTES", cls.socket_send_buffer_bytes),
            login_max_failures=_int("LOGIN_MAX_FAILURES", cls.login_max_failures),
            login_window_s=_int("LOGIN_WINDOW_S", cls.login_window_s),
            max_bad_frames=_int("MAX_BAD_FRAMES", cls.max_bad_frames),
            shutdown_grace_s=_float("SHUTDOWN_GRACE_S", cls.shutdown_grace_s),
            db_pool_min=_int("DB_POOL_MIN", cls.db_pool_min),
            db_pool_max=_int("DB_POOL_MAX", cls.db_pool_max),
            db_statement_cache_size=_int("DB_STATEMENT_CACHE_SIZE", cls.db_statement_cache_size),
            db_command_timeout_s=_float("DB_COMMAND_TIMEOUT_S", cls.db_command_timeout_s),
            replica_max_lag_bytes=_int("REPLICA_MAX_LAG_BYTES", cls.replica_max_lag_bytes),
            replica_check_interval_s=_float("REPLICA_CHECK_INTERVAL_S", cls.replica_check_interval_s),
            ryw_ttl_s=_int("RYW_TTL_S", cls.ryw_ttl_s),
            redis_timeout_s=_float("REDIS_TIMEOUT_S", cls.redis_timeout_s),
            redis_probe_interval_s=_float("REDIS_PROBE_INTERVAL_S", cls.redis_probe_interval_s),
            subscribe_wait_s=_float("SUBSCRIBE_WAIT_S", cls.subscribe_wait_s),
            auth_deadline_s=_float("AUTH_DEADLINE_S", cls.auth_deadline_s),
            max_sockets_per_address=_int("MAX_SOCKETS_PER_ADDRESS", cls.max_sockets_per_address),
            max_sockets=_int("MAX_SOCKETS", cls.max_sockets),
            trusted_proxies=_networks("TRUSTED_PROXIES"),
            max_frame_values=_int("MAX_FRAME_VALUES", cls.max_frame_values),
            max_frame_depth=_int("MAX_FRAME_DEPTH", cls.max_frame_depth),
            auth_max_per_address=_int("AUTH_MAX_PER_ADDRESS", cls.auth_max_per_address),
            auth_address_window_s=_int("AUTH_ADDRESS_WINDOW_S", cls.auth_address_window_s),
            hash_concurrency=_int("HASH_CONCURRENCY", cls.hash_concurrency),
            hash_max_wait_s=_float("HASH_MAX_WAIT_S", cls.hash_max_wait_s),
            session_max_age_s=_int("SESSION_MAX_AGE_S", cls.session_max_age_s),
            session_cleanup_interval_s=_float("SESSION_CLEANUP_INTERVAL_S", cls.session_cleanup_interval_s),
            event_retention_s=_int("EVENT_RETENTION_S", cls.event_retention_s),
            ops_token=os.environ.get("OPS_TOKEN", ""),
            metrics_host=os.environ.get("METRICS_HOST", cls.metrics_host),
            metrics_port=_port("METRICS_PORT", cls.metrics_port),
            log_format=log_format(),
            demo_dir=_demo_dir("DEMO_DIR"),
            presence_offline_after_s=_float("PRESENCE_OFFLINE_AFTER_S", cls.presence_offline_after_s),
            presence_ttl_s=_float("PRESENCE_TTL_S", cls.presence_ttl_s),
            presence_heartbeat_s=_float("PRESENCE_HEARTBEAT_S", cls.presence_heartbeat_s),
            presence_sweep_interval_s=_float("PRESENCE_SWEEP_INTERVAL_S", cls.presence_sweep_interval_s),
            **_push_settings(),
        )._checked()

    def _checked(self) -> "Config":
        """Settings that parse but cannot work together; the error names the variable."""
        if is_cluster(self.redis_url):
            try:
                ClusterAddress(self.redis_url)
            except ValueError as exc:
                raise ConfigError(f"REDIS_URL={self.redis_url!r} is not a Redis Cluster URL "
                                  f"(redis+cluster://host:port,host:port): {exc}") from None
        if not 0 <= self.presence_offline_after_s <= 60:
            raise ConfigError(f"PRESENCE_OFFLINE_AFTER_S={self.presence_offline_after_s} must be between 0 and 60")
        # Past 60 s a killed process's users would stay online longer than the contract allows.
        if not 0 < self.presence_ttl_s <= 60:
            raise ConfigError(f"PRESENCE_TTL_S={self.presence_ttl_s} must be above 0 and at most 60")
        if not 0 < self.presence_heartbeat_s < self.presence_ttl_s:
            raise ConfigError(f"PRESENCE_HEARTBEAT_S={self.presence_heartbeat_s} must be above 0 and below "
                              f"PRESENCE_TTL_S ({self.presence_ttl_s})")
        if not 0 < self.presence_sweep_interval_s <= 5:
            raise ConfigError(f"PRESENCE_SWEEP_INTERVAL_S={self.presence_sweep_interval_s} must be above 0 and at most 5")
        return self

    def missing_secrets(self) -> list[str]:
        """Names of the secrets that are not set (empty)."""
        return [name for name, value in zip(SECRETS, (self.jwt_secret, self.kyc_webhook_secret)) if not value]

    def short_secrets(self) -> list[str]:
        """Names of the secrets set but shorter than ``MIN_SECRET_BYTES``."""
        return [name for name, value in zip(SECRETS, (self.jwt_secret, self.kyc_webhook_secret))
                if value and len(value.encode()) < MIN_SECRET_BYTES]

    def with_(self, **changes) -> "Config":
        return replace(self, **changes)
