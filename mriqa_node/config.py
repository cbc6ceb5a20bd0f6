"""Node configuration: one TOML file, environment overrides, validated at start.

Precedence (highest first): environment variables ``MRIQA_<SECTION>__<KEY>`` (for example
``MRIQA_DICOM__PORT=11113``), the TOML file (``--config PATH`` or ``MRIQA_CONFIG``), defaults.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mriqa_node.domain.drift import DriftRule


def _compiles(v: str) -> str:
    try:
        re.compile(v)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from exc
    return v


Regex = Annotated[str, AfterValidator(_compiles)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DicomConfig(_Section):
    ae_title: str = "MRIQA"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aets: list[str] = ["SCANNER1"]
    # Empty: any address. Otherwise only these peer IPs may associate.
    allowed_ips: list[str] = []
    max_associations: int = Field(32, ge=1)  # per receiver process
    # Receiver processes on the port (SO_REUSEPORT), each with its own journal: associations
    # at once then use several cores. The limits above apply to each process.
    receivers: int = Field(1, ge=1, le=64)
    # Connections open at once from one address; more are closed at once (logged), so a peer
    # that opens connections and sends nothing cannot take every slot from the scanners.
    max_associations_per_peer: int = Field(8, ge=1)
    # Seconds a new connection may take to send its association request, and an established
    # association may stay silent, before the node drops it.
    acse_timeout_seconds: float = Field(10.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)
    max_pdu: int = Field(0, ge=0, description="0: unlimited")
    # The largest instance taken: a bigger one (or a PDU declaring more) closes the connection
    # before it is held in memory. Memory for datasets in flight <= max_associations times it.
    max_instance_mb: int = Field(1024, ge=1)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""  # when set, peers must present a certificate signed by this CA

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        if not 1 <= len(v) <= 16 or "\\" in v or not v.isprintable():
            raise ValueError("AE title must be 1-16 printable characters without backslash")
        return v

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


class StorageConfig(_Section):
    spool_dir: Path = Path("var/spool")
    database_url: str = "sqlite:///var/mriqa.db"
    # fsync file and directory before answering Success; off only if power-cut loss is acceptable.
    fsync: bool = True
    # Below this much free space (MiB) on the spool's disk the node answers 0xA700 (out of
    # resources: the scanner keeps the images and retries) instead of filling it; 0: off.
    min_free_mb: float = Field(512.0, ge=0)
    # The receive journal (Success = its record synced): one per receiver process, under
    # <spool_dir>/.journal; a segment of this size is deleted once applied.
    journal_segment_mb: float = Field(16.0, gt=0)


class SeriesConfig(_Section):
    idle_seconds: float = Field(5.0, gt=0)
    # After the sending association is released, a series without an announced size is complete
    # once it has been quiet this long (the release is a hint that the scanner is done).
    release_grace_seconds: float = Field(1.0, ge=0)


class ModelConfig(_Section):
    # A fixed artifact directory. Empty: the model installed with `mriqa model install`, else
    # the bundled model (or an untrained ConvNet until one is bundled).
    path: str = ""
    dir: Path = Path("var/models")  # where `mriqa model install` keeps artifacts
    reload_seconds: float = Field(5.0, gt=0)  # how often a running node looks for a new model


class WorkerConfig(_Section):
    enabled: bool = True  # run the scoring worker inside `mriqa serve`
    max_batch: int = Field(16, ge=1)
    max_wait_ms: float = Field(20.0, ge=0)
    poll_seconds: float = Field(0.2, gt=0)
    # A claim not finished in this time (its worker died on another host) is taken again.
    claim_seconds: float = Field(30.0, gt=0)


class VerdictConfig(_Section):
    """Overrides of the model's series policy; unset keys come from model.json."""

    slice_threshold: float | None = Field(None, ge=0, le=1)
    series_threshold: float | None = Field(None, ge=0, le=1)
    top_fraction: float | None = Field(None, gt=0, le=1)
    worst_count: int | None = Field(None, ge=1)


class DriftConfig(_Section):
    """Each scanner (calling AE) and protocol against its own past (services/drift.py)."""

    check_seconds: float = Field(60.0, gt=0)  # between the node's looks
    recent: int = Field(20, ge=2)  # series in the recent window
    baseline: int = Field(60, ge=2)  # at most, before it
    min_baseline: int = Field(20, ge=2)  # fewer baseline series: the group says nothing yet
    z: float = Field(3.0, gt=0)  # |z| of the alert or not-assessed rate change
    ks_alpha: float = Field(0.001, gt=0, lt=1)  # of the score distributions' KS test

    def rule(self) -> DriftRule:
        return DriftRule(**self.model_dump(exclude={"check_seconds"}))


class ConsoleConfig(_Section):
    """The technologist console (web pages, JSON API, live push) served by `mriqa serve`."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # The address people use, for links in webhooks; empty: http://host:port.
    public_url: str = ""
    # Key that signs session cookies; created (0600) at first start when missing.
    secret_file: Path = Path("var/console.secret")
    session_hours: float = Field(12.0, gt=0)
    # Failed sign-ins: after login_slow_after failures each attempt waits (1 s, doubling to
    # 8 s); after login_lock_after for one user name, or login_lock_after_per_address from one
    # client address, within login_lockout_minutes, attempts are refused for that long (429).
    login_slow_after: int = Field(3, ge=1)
    login_lock_after: int = Field(10, ge=1)
    login_lock_after_per_address: int = Field(30, ge=1)
    login_lockout_minutes: float = Field(15.0, gt=0)
    tls_cert: str = ""  # serve HTTPS (and mark cookies Secure) when set
    tls_key: str = ""
    # Where rendered thumbnails and heat maps are cached.
    cache_dir: Path = Path("var/cache")

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return (self.public_url or f"{scheme}://{self.host}:{self.port}").rstrip("/")


class WebhookConfig(_Section):
    """A URL that gets a signed JSON POST for each verdict and alert."""

    name: str = Field(min_length=1, max_length=100)
    url: str = Field(pattern=r"^https?://")
    # HMAC-SHA256 key for the X-MRIQA-Signature header; empty: unsigned (not recommended).
    secret: str = ""
    events: list[Literal["verdict", "alert", "alert_acknowledged", "drift", "drift_cleared"]] = [
        "verdict", "alert"]  # fmt: skip
    timeout_seconds: float = Field(5.0, gt=0)
    max_attempts: int = Field(12, ge=1)
    # Retry n waits min(backoff_seconds * 2**(n-1), backoff_max_seconds).
    backoff_seconds: float = Field(1.0, gt=0)
    backoff_max_seconds: float = Field(300.0, gt=0)


class RemoteAE(_Section):
    """Another DICOM application entity we connect to (a PACS, an archive)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False  # DICOM TLS; tls_ca verifies the peer, tls_cert/tls_key identify us
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        return DicomConfig._ae_title(v)


class DestinationConfig(RemoteAE):
    """A PACS (or other archive) that gets what the node receives, and its QA objects."""

    name: str = Field(min_length=1, max_length=64)
    forward: bool = True  # forward received instances (filtered by the rules below)
    # Rules: an instance is forwarded when it matches all the non-empty ones.
    calling_aets: list[str] = []
    modalities: list[str] = []
    series_description: Regex = ""  # a regular expression, searched case-insensitively
    send_kos: bool = True  # IOCM rejection notes (KOS 113001) for rejected series
    send_sr: bool = True  # a QA result SR per decided series
    send_montage: bool = False  # a Secondary Capture montage with heat maps per verdict
    batch: int = Field(64, ge=1)  # instances per association
    # Associations in parallel, each sending a different series (a series always goes in
    # order, its instances before its QA objects, over one association at a time). pynetdicom
    # waits for each C-STORE response, so lanes are what make forwarding fast; 1: the whole
    # destination in strict order.
    lanes: int = Field(3, ge=1, le=8)
    # 0: retry forever, so nothing is lost while the PACS is down for hours.
    max_attempts: int = Field(0, ge=0)
    backoff_seconds: float = Field(1.0, gt=0)
    backoff_max_seconds: float = Field(60.0, gt=0)


class PacsConfig(_Section):
    destinations: list[DestinationConfig] = []
    # The PACS to query and retrieve from (`mriqa pacs find/pull`); it must know our AE title.
    query: RemoteAE | None = None
    # Send a rejection note as soon as a series is non-diagnostic, without waiting for the
    # technologist to confirm (off: only "rescanned" or `mriqa reject` rejects).
    reject_on_non_diagnostic: bool = False

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, v: list[DestinationConfig]) -> list[DestinationConfig]:
        names = [d.name for d in v]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        return v


# Series descriptions of localizers and calibration scans that vendors do not mark LOCALIZER.
LOCALIZER_DESCRIPTIONS = r"localizer|localiser|scout|survey|3-?plane|\bloc\b|calibration|\bcal\b"


class ScopeRuleConfig(_Section):
    """Include or exclude images whose ``field`` matches ``pattern`` (regex, any case)."""

    field: Literal["description", "protocol", "calling_aet", "body_part", "sequence",
                   "orientation"]  # fmt: skip
    pattern: Annotated[Regex, Field(min_length=1)]


class ScopeConfig(_Section):
    """The site's rules on top of the model's scope (model.json): ``exclude`` narrows it (and
    wins), ``include`` widens it past the model's own. Out of scope means not scored and "not
    assessed", never an alert."""

    exclude: list[ScopeRuleConfig] = [
        ScopeRuleConfig(field="description", pattern=LOCALIZER_DESCRIPTIONS)
    ]
    include: list[ScopeRuleConfig] = []


class LoggingConfig(_Section):
    level: str = "INFO"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MRIQA_", env_nested_delimiter="__", extra="forbid", toml_file=None
    )

    dicom: DicomConfig = DicomConfig()
    storage: StorageConfig = StorageConfig()
    series: SeriesConfig = SeriesConfig()
    model: ModelConfig = ModelConfig()
    worker: WorkerConfig = WorkerConfig()
    verdict: VerdictConfig = VerdictConfig()
    drift: DriftConfig = DriftConfig()
    console: ConsoleConfig = ConsoleConfig()
    webhooks: list[WebhookConfig] = []
    pacs: PacsConfig = PacsConfig()
    scope: ScopeConfig = ScopeConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("webhooks")
    @classmethod
    def _unique_webhook_names(cls, v: list[WebhookConfig]) -> list[WebhookConfig]:
        names = [w.name for w in v]
        if len(names) != len(set(names)):
            raise ValueError("webhook names must be unique")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


def load_config(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load and validate; ``path`` falls back to MRIQA_CONFIG, then to defaults only."""
    path = path or os.environ.get("MRIQA_CONFIG") or None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    settings_cls = Settings
    if path is not None:  # a subclass bound to this file: pydantic-settings reads it from config
        bound = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})
        settings_cls = type("Settings", (Settings,), {"model_config": bound})
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        lines = [f"invalid configuration{where}:"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from exc


def to_toml(settings: Settings) -> str:
    """The effective configuration as TOML, for `mriqa config show` (secrets masked)."""
    out: list[str] = []
    for section, values in settings.model_dump(mode="json").items():
        if isinstance(values, list):  # an array of tables, e.g. [[webhooks]]
            for item in values:
                _table(f"[[{section}]]", section, item, out)
        else:
            _table(f"[{section}]", section, values, out)
    return "\n".join(out)


def _table(header: str, name: str, values: dict[str, Any], out: list[str]) -> None:
    """One table, then its sub-tables ([a.b]) and arrays of tables ([[a.b]])."""
    out.append(header)
    nested: list[tuple[str, str, dict[str, Any]]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            nested.append((f"[{name}.{key}]", f"{name}.{key}", value))
        elif _is_table_list(value):
            nested += [(f"[[{name}.{key}]]", f"{name}.{key}", item) for item in value]
        elif value is None:
            out.append(f"# {key} = (from model)" if name == "verdict" else f"# {key} = (unset)")
        else:
            out.append(f"{key} = {_toml_value(key, value)}")
    out.append("")
    for sub_header, sub_name, sub_values in nested:
        _table(sub_header, sub_name, sub_values, out)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_value(key: str, value: Any) -> str:
    if value and (key == "secret" or key.endswith(("_secret", "password"))):
        return '"***"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value("", v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
