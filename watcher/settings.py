"""Settings: one frozen object, built once at start from env, TOML, credentials and defaults.

Precedence, highest first: `PRODUCTIV_<NAME>` environment variables, the TOML file named by
`--config` or `PRODUCTIV_CONFIG`, files in `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`),
then the defaults below. Nothing here runs at import time.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import (
    ByteSize,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .values import masked_proxy, pem_problem, proxy_problem, proxy_secrets, with_scheme

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

FileType = Literal["users", "contracts", "other"]
FILE_TYPES: tuple[FileType, ...] = ("users", "contracts", "other")
SECRET_FIELDS = ("client_secret", "access_token")
# Shown in the text start line even at their defaults: what an operator checks first.
ESSENTIAL_FIELDS = ("app_id", "api_url", "drop_dir", "done_dir", "failed_dir")
CREDENTIAL_FIELDS = ("client_id", *SECRET_FIELDS)
MAX_PUT_BYTES = 5 * 1024**3  # S3's limit for a single PUT
MAX_CONCURRENCY = 64
DAY_SECONDS = 86400.0  # the bound of every *_seconds setting: larger ones overflow OS timeouts
KNOWN_VARIABLES = frozenset({"PRODUCTIV_CONFIG"})  # PRODUCTIV_* that are not settings
# What SIGHUP can change in a running daemon; anything else needs a restart.
LIVE_SETTINGS = frozenset(
    {
        "log_level",
        "settle_seconds",
        "batch_size",
        "upload_concurrency",
        "upload_rate_limit",
        "min_upload_rate",
        "max_attempts",
        "retry_initial_seconds",
        "retry_max_seconds",
        "rescan_seconds",
        "shutdown_timeout_seconds",
        "max_file_size",
        "done_retention_days",
        "status_seconds",
    }
)

log = logging.getLogger(__name__)

DEFAULT_IGNORE = (
    ".*",
    "*.tmp",
    "*.part",
    "*.partial",
    "*.crdownload",
    "*.swp",
    "*~",
    "~$*",
    "Thumbs.db",
    "desktop.ini",
)


class ConfigError(Exception):
    """Settings or folders that make running pointless: the CLI exits 78 (EX_CONFIG)."""


class CredentialsDirectorySource(PydanticBaseSettingsSource):
    """Reads `$CREDENTIALS_DIRECTORY/<field>` (systemd `LoadCredential=`) for the credential fields.

    pydantic-settings' own `secrets_dir` wants the prefixed env name as the file name; systemd
    units name credentials `client_secret`, so this small source reads exactly that.
    """

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._folder = os.environ.get("CREDENTIALS_DIRECTORY")

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads all fields at once

    def __call__(self) -> dict[str, Any]:
        if not self._folder:
            return {}
        values: dict[str, Any] = {}
        for name in CREDENTIAL_FIELDS:
            path = Path(self._folder) / name
            if path.is_file():
                values[name] = read_credential(path)
                if name in SECRET_FIELDS and path.stat().st_mode & stat.S_IROTH:
                    log.warning(
                        "secret file %s is readable by others: chmod 0600 it",
                        path,
                        extra={"event": "insecure_secret"},
                    )
        return values


def read_credential(path: Path) -> str:
    """A credential file's text, without its final newline; unreadable is a ConfigError."""
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"credential file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"credential file {path} is not UTF-8 (byte {exc.start})") from None


class Settings(BaseSettings):
    """Every setting of the daemon; see docs/configuration.md for the meaning of each."""

    model_config = SettingsConfigDict(
        env_prefix="PRODUCTIV_",
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,
        env_ignore_empty=True,
        case_sensitive=False,
        allow_inf_nan=False,  # inf and nan overflow or poison every timeout and comparison
    )

    app_id: str = Field(min_length=1)
    client_id: str | None = None
    client_secret: SecretStr | None = None
    access_token: SecretStr | None = None
    client_auth: Literal["post", "basic"] = "post"
    api_url: str = "https://public-api.productiv.com"
    token_url: str = "https://login.api.productiv.com/oauth2/token"  # noqa: S105
    scope: str = "https://api.productiv.com/connector.write"
    proxy: SecretStr | None = None  # beats HTTPS_PROXY/HTTP_PROXY; may hold user:password
    ca_bundle: Path | None = None  # PEM CAs trusted beside certifi's (a TLS-inspecting proxy)

    drop_dir: Path | None = None
    done_dir: Path | None = None
    failed_dir: Path | None = None
    file_type: FileType | None = None

    settle_seconds: float = Field(default=2.0, gt=0, le=3600)
    shutdown_timeout_seconds: float = Field(default=20.0, ge=0, le=DAY_SECONDS)
    batch_size: int = Field(default=50, ge=1, le=1000)
    upload_concurrency: int = Field(default=4, ge=1, le=MAX_CONCURRENCY)
    max_attempts: int = Field(default=5, ge=1)
    retry_initial_seconds: float = Field(default=1.0, gt=0, le=DAY_SECONDS)
    retry_max_seconds: float = Field(default=300.0, gt=0, le=DAY_SECONDS)
    request_timeout_seconds: float = Field(default=30.0, gt=0, le=DAY_SECONDS)
    # A PUT is a stall, aborted and retried, only below this rate for request_timeout_seconds.
    min_upload_rate: ByteSize = Field(default=ByteSize(1024), ge=1, le=1024**3)
    upload_rate_limit: ByteSize = Field(default=ByteSize(0), ge=0)  # bytes/s for all PUTs; 0: none
    max_file_size: ByteSize = Field(default=ByteSize(MAX_PUT_BYTES), ge=0, le=MAX_PUT_BYTES)
    ignore_patterns: tuple[str, ...] = DEFAULT_IGNORE
    polling: bool = False
    poll_interval_seconds: float = Field(default=2.0, gt=0, le=DAY_SECONDS)
    rescan_seconds: float = Field(default=60.0, gt=0, le=DAY_SECONDS)
    content_type: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    state_dir: Path | None = None
    receipts_max_bytes: ByteSize = Field(default=ByteSize(10 * 1024**2), ge=4096)
    receipts_keep: int = Field(default=5, ge=0, le=1000)
    status_seconds: float = Field(default=2.0, gt=0, le=DAY_SECONDS)
    done_retention_days: float | None = Field(default=None, gt=0)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_textfile: Path | None = None
    canary_seconds: float | None = Field(default=None, gt=0, le=DAY_SECONDS)
    # e.g. ".done": NAME goes once NAME.done exists beside it (markers.py); empty: off
    ready_marker: str = Field(default="", max_length=64)
    late_write_seconds: float = Field(default=600.0, ge=0, le=DAY_SECONDS)  # 0: off

    @field_validator("api_url", "token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")) or "@" in value.split("/")[2]:
            raise ValueError("must be an http(s) URL without user:password")
        return value.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: SecretStr | None) -> SecretStr | None:

        if value is None or not value.get_secret_value().strip():
            return None
        url = with_scheme(value.get_secret_value())
        problem = proxy_problem(url)
        if problem:
            raise ValueError(problem)
        return SecretStr(url)

    @field_validator("ca_bundle")
    @classmethod
    def _pem_file(cls, value: Path | None) -> Path | None:

        path = value.expanduser().absolute() if value is not None else None
        problem = pem_problem(path) if path is not None else None
        if problem:
            raise ValueError(problem)
        return path

    @field_validator("upload_rate_limit", mode="before")
    @classmethod
    def _no_limit(cls, value: Any) -> Any:
        """An empty value (`upload_rate_limit = ""` in TOML) means no limit, as 0 does."""
        return 0 if isinstance(value, str) and not value.strip() else value

    @field_validator("content_type")
    @classmethod
    def _header_value(cls, value: str) -> str:
        if any(not " " <= char <= "~" for char in value):
            raise ValueError("must be printable ASCII on one line (a media type, e.g. text/csv)")
        return value

    @field_validator("ready_marker")
    @classmethod
    def _suffix(cls, value: str) -> str:
        if value and (value.strip() != value or "/" in value or "\0" in value):
            raise ValueError("must be a name suffix such as .done, without /, NUL or spaces")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("file_type", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value in ("", "none") else value

    @field_validator("done_retention_days", "canary_seconds", "metrics_port", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return None if value in ("", "none", "off") else value

    @field_validator("drop_dir", "done_dir", "failed_dir", "state_dir", "metrics_textfile")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().absolute() if value is not None else None

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.access_token is None and (self.client_id is None or self.client_secret is None):
            raise ValueError("client_id and client_secret are required unless access_token is set")
        if self.ready_marker and any(
            fnmatch.fnmatchcase(f"report.csv{self.ready_marker}", p) for p in self.ignore_patterns
        ):
            raise ValueError(
                f"ready_marker {self.ready_marker}: names ending in it match ignore_patterns,"
                " so markers would go unseen"
            )
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds must be at least retry_initial_seconds")
        if self.drop_dir is not None:
            # Frozen model: derived defaults are filled in once, here.
            parent = self.drop_dir.parent
            if self.state_dir is None:
                object.__setattr__(self, "state_dir", parent / "state")
            for name in ("done_dir", "failed_dir"):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, parent / name.removesuffix("_dir"))
                folder = getattr(self, name)
                if folder == self.drop_dir or folder.is_relative_to(self.drop_dir):
                    raise ValueError(f"{name} must be outside drop_dir")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load() passes the TOML file's table as init arguments: env beats it, credentials lose.
        return env_settings, init_settings, CredentialsDirectorySource(settings_cls)

    def public_view(self) -> dict[str, Any]:
        """The effective settings for the start-up log line, with secrets masked."""
        view = self.model_dump(mode="json")
        for name in SECRET_FIELDS:
            if view.get(name) is not None:
                view[name] = "***"
        if self.proxy is not None:
            view["proxy"] = masked_proxy(self.proxy.get_secret_value())
        return view

    def brief_view(self) -> dict[str, Any]:
        """For people (text logs): the essentials, then each setting that differs from its
        default, secrets masked. The JSON log line carries `public_view`, every setting."""
        view = self.public_view()
        fields = Settings.model_fields
        changed = [name for name, info in fields.items() if getattr(self, name) != info.default]
        return {name: view[name] for name in dict.fromkeys([*ESSENTIAL_FIELDS, *changed])}

    def secret_values(self) -> list[str]:
        """Values that must never appear in any output (the log filter scrubs them)."""

        secrets = [getattr(self, name) for name in SECRET_FIELDS]
        values = [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]
        return values + proxy_secrets(self.proxy.get_secret_value() if self.proxy else "")


def load(config: Path | None = None, credentials: bool = True) -> Settings:
    """Build the settings; any problem raises ConfigError naming each bad setting.

    `credentials=False` is for the commands that never call the API (`status`,
    `retry-failed`): an operator may run them without the secret, and without app_id.
    """
    unknown = unknown_variables(os.environ)
    if unknown:
        raise ConfigError("\n".join(f"invalid setting {name}: no such setting" for name in unknown))
    if config is None and os.environ.get("PRODUCTIV_CONFIG"):
        config = Path(os.environ["PRODUCTIV_CONFIG"])
    table = read_toml(config) if config is not None else {}
    if not credentials:
        table.setdefault("access_token", "not-used-by-this-command")
        table.setdefault("app_id", "not-used-by-this-command")
    try:
        return Settings(**table)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    except SettingsError as exc:  # e.g. a list setting in the environment that is not JSON
        raise ConfigError(f"invalid settings: {exc}") from None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """`PRODUCTIV_*` variables that name no setting: a misspelt one is an error, as a misspelt
    key in the config file is, never silently ignored."""
    known = KNOWN_VARIABLES | {f"PRODUCTIV_{name.upper()}" for name in Settings.model_fields}
    return sorted(
        name
        for name in environ
        if name.upper().startswith("PRODUCTIV_") and name.upper() not in known
    )


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file's top-level table; a missing or broken file is a ConfigError, never skipped."""
    try:
        with path.open("rb") as handle:
            table: dict[str, Any] = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 (byte {exc.start})") from None
    warn_if_exposed(path, table)
    return table


def warn_if_exposed(path: Path, table: Mapping[str, Any]) -> None:
    """A config file holding a secret should not be readable by everyone."""
    proxy_login = "@" in str(table.get("proxy") or "")  # user:password@host
    if not proxy_login and not any(table.get(name) for name in SECRET_FIELDS):
        return
    if path.stat().st_mode & stat.S_IROTH:
        log.warning(
            "config file %s holds a secret and is readable by others: chmod o-r it",
            path,
            extra={"event": "insecure_secret"},
        )


def describe(exc: ValidationError) -> str:
    """One line per bad setting, naming it and why, without echoing the value."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        name = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(
            f"invalid setting {name}: {message}" if name else f"invalid settings: {message}"
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Paths:
    """The daemon's folders, resolved once from the settings: none of them can be None, so no
    code downstream checks (an `assert x is not None` is gone under `python -O`)."""

    drop: Path
    done: Path
    failed: Path
    state: Path  # the status file and the receipts journal

    @classmethod
    def of(cls, settings: Settings) -> Paths:
        """The folders, or ConfigError when drop_dir is not set (the others derive from it)."""
        s = settings
        if s.drop_dir is None or s.done_dir is None or s.failed_dir is None or s.state_dir is None:
            raise ConfigError("invalid setting drop_dir: Field required")
        return cls(s.drop_dir, s.done_dir, s.failed_dir, s.state_dir)


class Reconfigurable(Protocol):
    """A component that takes the live settings of a reload (`LIVE_SETTINGS`) from then on."""

    def reconfigure(self, settings: Settings) -> None: ...


def require_state_dir(settings: Settings) -> Path:
    """state_dir (set, or derived from drop_dir), or ConfigError naming what to set."""
    if settings.state_dir is None:
        raise ConfigError("invalid setting state_dir: Field required (or set drop_dir)")
    return settings.state_dir


def reloaded(running: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """(the settings to run with, changes applied, changes that need a restart) after a reload.

    Only the live settings are taken from `new`: one that needs a restart keeps its running
    value everywhere (retention sweeps the done_dir the finisher fills) until the restart.
    """
    applied, restart = split_changes(running, new)
    effective = running.model_copy(update={name: getattr(new, name) for name in applied})
    return effective, applied, restart


def split_changes(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """(changed settings a reload applies live, changed settings that need a restart)."""
    changed = [name for name in Settings.model_fields if getattr(old, name) != getattr(new, name)]
    return (
        [name for name in changed if name in LIVE_SETTINGS],
        [name for name in changed if name not in LIVE_SETTINGS],
    )
