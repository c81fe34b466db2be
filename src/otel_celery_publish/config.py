"""Settings: every knob in one frozen dataclass, read from ``OTEL_CELERY_PUBLISH_*`` or kwargs."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

Durability = Literal["sync", "spool", "async"]
DURABILITIES: tuple[str, ...] = ("sync", "spool", "async")

ENV_PREFIX = "OTEL_CELERY_PUBLISH_"
DEFAULT_REDACT_KEYS = frozenset(
    {"password", "passwd", "secret", "token", "api_key", "apikey", "authorization", "credit_card"}
)


def default_spool_dir() -> str:
    """``$XDG_STATE_HOME/otel-celery-publish/spool`` (``~/.local/state/...``), else the temp dir.

    Per user and persistent across reboots: a spool exists to outlive a crash.
    """
    home = os.path.expanduser("~")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    if os.path.isabs(state) and os.access(home, os.W_OK):
        return os.path.join(state, "otel-celery-publish", "spool")
    return os.path.join(tempfile.gettempdir(), f"otel-celery-publish-{os.getuid()}", "spool")


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _keys(value: str | Any) -> frozenset[str]:
    items = value.split(",") if isinstance(value, str) else value
    return frozenset(k.strip().lower() for k in items if k.strip())


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved configuration: field ``x`` is env var ``OTEL_CELERY_PUBLISH_X`` and kwarg ``x``."""

    audit_url: str = "sqlite:///celery_audit.db"
    durability: Durability = "sync"
    use_links: bool = False
    redact_keys: frozenset[str] = DEFAULT_REDACT_KEYS
    redact_payload: bool = False
    create_schema: bool = True
    table_name: str = "celery_publish_audit"
    flush_interval: float = 1.0
    max_pending: int = 10_000
    repr_maxsize: int = 4096
    max_payload_bytes: int = 1_048_576
    spool_dir: str = dataclasses.field(default_factory=default_spool_dir)
    spool_fsync: bool = False
    spool_max_bytes: int = 1_073_741_824
    db_timeout: float = 2.0
    heartbeat_interval: float = 30.0
    trace_url: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build from the environment, then apply non-None ``overrides`` (instrument() kwargs)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if overrides.get(field.name) is not None:
                raw = overrides[field.name]
            if raw is None:
                continue
            values[field.name] = _convert(field.name, raw)
        if values.get("durability", "sync") not in DURABILITIES:
            raise ValueError(
                f"{ENV_PREFIX}DURABILITY must be one of {', '.join(DURABILITIES)}, "
                f"got {values['durability']!r}"
            )
        return cls(**values)


def _convert(name: str, raw: Any) -> Any:
    default = getattr(Settings, name, "")  # "" for fields with a default factory
    if not isinstance(raw, str):
        return _keys(raw) if isinstance(default, frozenset) else raw
    if isinstance(default, bool):
        return _bool(raw)
    if isinstance(default, frozenset):
        return _keys(raw)
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw
