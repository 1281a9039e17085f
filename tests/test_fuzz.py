"""Property-based and fuzz tests of the pure parts: whatever comes in, a clear answer or a
classified Fault comes out, never a traceback."""

from __future__ import annotations

import fnmatch
import json
import math
import os
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from watcher.daemon.notify import watchdog_interval
from watcher.pipeline.watching import is_ignored, locate
from watcher.remote.api import (
    SignedUrl,
    parse_token,
    parse_urls,
    query_values,
    url_expiry,
    url_problem,
)
from watcher.remote.faults import Fault, Kind, classify_put, retry_after_seconds, s3_error
from watcher.settings import DEFAULT_IGNORE, FILE_TYPES

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
NAMES = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5, unique=True)


@settings(max_examples=500)
@given(st.one_of(JSON, st.dictionaries(st.sampled_from(["access_token", "expires_in", "x"]), JSON)))
def test_any_token_answer_gives_a_token_or_a_service_fault(body):
    try:
        token, lifetime = parse_token(body)
    except Fault as fault:
        assert fault.kind is Kind.SERVICE and "access_token" in fault.reason
    else:
        assert isinstance(token, str) and token
        assert math.isfinite(lifetime) and lifetime > 0


@pytest.mark.long
@settings(max_examples=500)
@given(JSON, NAMES, st.floats(-1e6, 1e6))
def test_any_url_answer_gives_urls_for_asked_names_only_or_a_service_fault(body, names, skew):
    try:
        answer = parse_urls(body, names, skew)
    except Fault as fault:
        assert fault.kind is Kind.SERVICE
    else:
        assert set(answer) <= set(names)
        for value in answer.values():
            assert isinstance(value, SignedUrl) or value.kind is Kind.FINAL


@settings(max_examples=300)
@given(NAMES, st.dictionaries(st.text(max_size=12), st.text(max_size=60), max_size=6))
def test_url_maps_with_wrong_or_extra_names_are_handled(names, extra):
    body = {
        **extra,
        names[0]: "https://s3.example.com/b/k?X-Amz-Expires=60&X-Amz-Date=20261127T000000Z",
    }
    answer = parse_urls(body, names, 0.0)
    assert isinstance(answer[names[0]], SignedUrl)
    assert set(answer) <= set(names)


@given(st.text(max_size=200))
def test_any_url_is_judged_without_crashing(url):
    problem = url_problem(url)
    assert problem is None or isinstance(problem, str)
    url_expiry(url)


@given(
    st.text(st.sampled_from("ab.~$x*?[]!\n"), max_size=8),
    st.lists(st.text(st.sampled_from("ab.~$x*?[]!"), max_size=5), max_size=4),
)
def test_ignore_patterns_match_as_fnmatchcase_does(name, patterns):
    for ignore in (tuple(patterns), DEFAULT_IGNORE + tuple(patterns)):
        assert is_ignored(name, ignore) == any(fnmatch.fnmatchcase(name, p) for p in ignore)


QUERY_PIECES = ["Expires", "X-Amz-Date", "X-Amz-Expires", "X%2DAmz%2DDate", "=", "&", "+", "%"]


@given(st.lists(st.sampled_from(QUERY_PIECES) | st.text(max_size=3), max_size=12))
def test_query_values_reads_a_query_as_parse_qs_does(pieces):
    query = "".join(pieces)
    wanted = frozenset({"Expires", "X-Amz-Date", "X-Amz-Expires"})
    everything = parse_qs(query)
    assert query_values(query, wanted) == {k: v[0] for k, v in everything.items() if k in wanted}


@given(
    st.sampled_from(["https", "http", "ftp", "file", "HTTPS"]),
    st.text(st.characters(whitelist_categories=("Ll", "Nd")), min_size=1, max_size=10),
    st.text(st.characters(whitelist_categories=("Ll", "Nd")), max_size=10),
)
def test_credentials_in_a_url_are_always_refused(scheme, user, password):
    url = f"{scheme}://{user}:{password}@s3.amazonaws.com/b/k?x=1"
    assert url_problem(url) is not None


@given(st.binary(max_size=300), st.integers(100, 599))
def test_any_storage_answer_is_classified(body, status):
    kind = classify_put(status, body)
    assert (kind is None) == (200 <= status < 300)
    s3_error(body)


@example("²")  # str.isdigit() says yes, float() says no
@given(st.text(max_size=40))
def test_any_retry_after_is_a_bounded_number_or_none(value):
    seconds = retry_after_seconds(value, 1_795_763_700.0)
    assert seconds is None or 0 <= seconds <= 900


NAME_CHARS = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))


@given(
    st.lists(st.text(NAME_CHARS, min_size=1, max_size=20), min_size=1, max_size=4),
    st.sampled_from([None, *FILE_TYPES]),
)
def test_locate_never_places_a_file_outside_the_drop_folder_or_under_a_wrong_type(parts, default):
    if any(p in (".", "..") for p in parts):
        return
    path = os.path.join("/d", *parts)
    spot = locate(path, "/d", default, DEFAULT_IGNORE)
    if spot is None:
        return
    assert Path(spot.path).parent in (Path("/d"), *(Path("/d") / t for t in FILE_TYPES))
    assert spot.name == parts[-1]
    assert spot.file_type == (parts[0] if len(parts) == 2 else default)
    assert spot.rel == "/".join(parts)
    json.dumps(spot.rel)


@example({"WATCHDOG_USEC": "²"})
@given(st.dictionaries(st.sampled_from(["WATCHDOG_USEC", "WATCHDOG_PID"]), st.text(max_size=12)))
def test_any_watchdog_environment_gives_an_interval_or_none(environ):
    interval = watchdog_interval(environ, 4242)
    assert interval is None or interval > 0


def test_the_watchdog_interval_is_half_the_period_and_only_for_our_pid():
    assert watchdog_interval({"WATCHDOG_USEC": "90000000"}, 7) == 45.0
    assert watchdog_interval({"WATCHDOG_USEC": "90000000", "WATCHDOG_PID": "7"}, 7) == 45.0
    assert watchdog_interval({"WATCHDOG_USEC": "90000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({}, 7) is None
