"""Settings: sources and their precedence, validation messages, and secrets kept out of them."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watcher.settings import ConfigError, load

SECRET = "s3cr3t-value-for-tests"
# The environment holds neither NUL nor lone surrogates (os.environ could not encode them).
TEXT = st.text(st.characters(codec="utf-8", blacklist_characters="\x00"))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("PRODUCTIV_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("PRODUCTIV_APP_ID", "app")
    monkeypatch.setenv("PRODUCTIV_CLIENT_ID", "id")
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def toml(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_environment_beats_toml_beats_credentials_beats_defaults(env, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "client_secret").write_text("from-credentials\n")
    env.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = toml(tmp_path, 'batch_size = 7\nsettle_seconds = 3.5\ndrop_dir = "/srv/drop"\n')
    env.setenv("PRODUCTIV_BATCH_SIZE", "9")
    s = load(config)
    assert s.batch_size == 9  # env
    assert s.settle_seconds == 3.5  # TOML
    assert s.client_secret is not None
    assert s.client_secret.get_secret_value() == "from-credentials"  # newline stripped
    assert s.upload_concurrency == 4  # default
    assert s.done_dir == Path("/srv/done") and s.failed_dir == Path("/srv/failed")
    env.setenv("PRODUCTIV_CLIENT_SECRET", "from-env")
    assert load(config).client_secret.get_secret_value() == "from-env"  # env beats the file


def test_productiv_config_names_the_file(env, tmp_path):
    env.setenv("PRODUCTIV_CONFIG", str(toml(tmp_path, 'client_secret = "x"\nbatch_size = 3\n')))
    assert load().batch_size == 3


def test_lists_in_the_environment_are_json(env):
    env.setenv("PRODUCTIV_CLIENT_SECRET", "x")
    env.setenv("PRODUCTIV_IGNORE_PATTERNS", '["*.tmp", "draft-*"]')
    assert load().ignore_patterns == ("*.tmp", "draft-*")
    env.setenv("PRODUCTIV_IGNORE_PATTERNS", "*.tmp")
    with pytest.raises(ConfigError, match="ignore_patterns"):
        load()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch_size = 0", "invalid setting batch_size"),
        ("settle_seconds = -1", "invalid setting settle_seconds"),
        ('client_auth = "digest"', "invalid setting client_auth"),
        ('file_type = "invoices"', "invalid setting file_type"),
        ('max_file_size = "6GiB"', "invalid setting max_file_size"),
        ('api_url = "ftp://x"', "invalid setting api_url"),
        ('api_url = "https://u:p@x"', "invalid setting api_url"),
        ("bacth_size = 3", "invalid setting bacth_size: Extra inputs are not permitted"),
        ("retry_initial_seconds = 10\nretry_max_seconds = 5", "retry_max_seconds"),
        ('drop_dir = "/d"\ndone_dir = "/d/done"', "done_dir must be outside drop_dir"),
        ('log_level = "loud"', "invalid setting log_level"),
        ("request_timeout_seconds = inf", "invalid setting request_timeout_seconds"),
        ("rescan_seconds = nan", "invalid setting rescan_seconds"),
        ("shutdown_timeout_seconds = 1e12", "invalid setting shutdown_timeout_seconds"),
        ("done_retention_days = inf", "invalid setting done_retention_days"),
        ('content_type = "text/csv\\r\\nX-Injected: 1"', "invalid setting content_type"),
        ('content_type = "text/csv; charset=\u00e9"', "invalid setting content_type"),
    ],
)
def test_each_bad_setting_is_named(env, tmp_path, text, message):
    env.setenv("PRODUCTIV_CLIENT_SECRET", SECRET)
    with pytest.raises(ConfigError) as caught:
        load(toml(tmp_path, text))
    assert message in str(caught.value)
    assert SECRET not in str(caught.value)


def test_several_bad_settings_give_one_line_each(env, tmp_path):
    env.setenv("PRODUCTIV_BATCH_SIZE", "0")
    env.setenv("PRODUCTIV_UPLOAD_CONCURRENCY", "many")
    env.delenv("PRODUCTIV_APP_ID")
    with pytest.raises(ConfigError) as caught:
        load()
    lines = str(caught.value).splitlines()
    assert any(line.startswith("invalid setting app_id") for line in lines)
    assert any(line.startswith("invalid setting batch_size") for line in lines)
    assert any(line.startswith("invalid setting upload_concurrency") for line in lines)


def test_an_unknown_productiv_variable_is_named_like_a_misspelt_key(env):
    env.setenv("PRODUCTIV_CLIENT_SECRET", "x")
    env.setenv("PRODUCTIV_SETLE_SECONDS", "5")
    env.setenv("productiv_bacth_size", "5")
    with pytest.raises(ConfigError) as caught:
        load()
    assert str(caught.value).splitlines() == [
        "invalid setting PRODUCTIV_SETLE_SECONDS: no such setting",
        "invalid setting productiv_bacth_size: no such setting",
    ]
    env.delenv("PRODUCTIV_SETLE_SECONDS")
    env.delenv("productiv_bacth_size")
    env.setenv("PRODUCTIV_CONFIG", str(toml(Path.cwd(), "batch_size = 3")))
    assert load().batch_size == 3  # PRODUCTIV_CONFIG is no setting, yet known


def test_commands_without_the_api_need_neither_credentials_nor_app_id(env):
    env.delenv("PRODUCTIV_APP_ID")
    env.setenv("PRODUCTIV_DROP_DIR", "/srv/drop")
    assert load(credentials=False).drop_dir == Path("/srv/drop")
    with pytest.raises(ConfigError, match="app_id"):
        load()


def test_credentials_are_required_unless_a_token_is_given(env):
    with pytest.raises(ConfigError, match="client_id and client_secret are required"):
        load()
    env.setenv("PRODUCTIV_ACCESS_TOKEN", "tok")
    assert load().access_token is not None


def test_a_missing_or_broken_config_file_is_an_error(env, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(toml(tmp_path, "batch_size = = 3"))


def test_a_secret_never_shows_in_a_message_or_the_public_view(env, tmp_path):
    env.setenv("PRODUCTIV_CLIENT_SECRET", SECRET)
    env.setenv("PRODUCTIV_ACCESS_TOKEN", SECRET + "-token")
    s = load()
    assert SECRET not in repr(s) and SECRET not in str(s.public_view())
    env.setenv("PRODUCTIV_CLIENT_SECRET", "")
    env.setenv("PRODUCTIV_BATCH_SIZE", SECRET)  # a value in the wrong place is not echoed
    with pytest.raises(ConfigError) as caught:
        load()
    assert SECRET not in str(caught.value)


def test_the_brief_view_is_the_essentials_then_what_differs_from_the_defaults(env):
    env.setenv("PRODUCTIV_CLIENT_SECRET", SECRET)
    env.setenv("PRODUCTIV_ACCESS_TOKEN", SECRET + "-token")
    env.setenv("PRODUCTIV_DROP_DIR", "/srv/drop")
    env.setenv("PRODUCTIV_BATCH_SIZE", "9")
    env.setenv("PRODUCTIV_UPLOAD_CONCURRENCY", "4")  # the default: not shown
    assert list(load().brief_view().items()) == [
        ("app_id", "app"),
        ("api_url", "https://public-api.productiv.com"),  # shown even when it is the default
        ("drop_dir", "/srv/drop"),
        ("done_dir", "/srv/done"),
        ("failed_dir", "/srv/failed"),
        ("client_id", "id"),
        ("client_secret", "***"),
        ("access_token", "***"),
        ("batch_size", 9),
        ("state_dir", "/srv/state"),
    ]


def test_a_world_readable_config_holding_the_secret_is_warned_about(env, tmp_path, caplog):
    load(toml(tmp_path, f'client_secret = "{SECRET}"', mode=0o644))
    assert "readable by others" in caplog.text and SECRET not in caplog.text


def test_relative_paths_become_absolute_against_the_working_directory(env, tmp_path):
    env.setenv("PRODUCTIV_CLIENT_SECRET", "x")
    env.setenv("PRODUCTIV_DROP_DIR", "in/drop")
    assert load().drop_dir == tmp_path / "in" / "drop"


@settings(
    max_examples=200,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "batch_size",
                "settle_seconds",
                "max_file_size",
                "file_type",
                "polling",
                "ignore_patterns",
                "client_auth",
                "api_url",
                "log_format",
                "request_timeout_seconds",
                "rescan_seconds",
                "done_retention_days",
                "content_type",
                "nonsense",
            ]
        ),
        st.one_of(
            st.integers(),
            st.floats(allow_nan=True),
            TEXT,
            st.booleans(),
            st.lists(TEXT, max_size=3),
            st.none(),
        ),
    )
)
def test_fuzzed_settings_give_a_config_error_or_settings_never_a_traceback(env, tmp_path, values):
    env.setenv("PRODUCTIV_CLIENT_SECRET", "x")
    for name, value in values.items():
        env.setenv(f"PRODUCTIV_{name.upper()}", str(value) if value is not None else "")
    try:
        loaded = load()
    except ConfigError as exc:
        assert str(exc).startswith("invalid setting")
    else:  # what loads is usable: no timeout that overflows, no header that breaks a request
        numbers = [v for v in loaded.model_dump().values() if isinstance(v, float)]
        assert all(math.isfinite(v) and v <= threading.TIMEOUT_MAX for v in numbers)
        assert loaded.content_type.isascii() and loaded.content_type.isprintable()


def test_a_secret_file_readable_by_others_is_warned_about(env, tmp_path, caplog):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "client_secret").write_text(SECRET)
    (creds / "client_secret").chmod(0o644)
    env.setenv("CREDENTIALS_DIRECTORY", str(creds))
    load()
    assert "readable by others" in caplog.text and SECRET not in caplog.text
    caplog.clear()
    (creds / "client_secret").chmod(0o400)
    load()
    assert "readable by others" not in caplog.text
