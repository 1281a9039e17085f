"""The API client against the sandbox: tokens (both client-auth styles), reuse and refresh,
signed-URL answers good and bad, and the clock of the API versus ours."""

from __future__ import annotations

import time

import pytest

from tests.conftest import make_settings
from tests.helpers import wait_for
from watcher.remote.api import ApiClient, SignedUrl
from watcher.remote.faults import Fault, Kind
from watcher.sandbox.productiv import Sandbox


@pytest.fixture
def client(sandbox: Sandbox):
    api = ApiClient(make_settings(sandbox, None))
    yield api
    api.close()


@pytest.mark.parametrize("style", ["post", "basic"])
def test_both_client_auth_styles_get_a_token(sandbox, style):
    sandbox.client_secret = "a:b c+d%e/f"  # Basic auth must form-encode before base64
    api = ApiClient(
        make_settings(sandbox, None, client_auth=style, client_secret=sandbox.client_secret)
    )
    try:
        assert api.token()
    finally:
        api.close()


def test_a_token_is_reused_until_near_its_expiry(sandbox, client):
    for _ in range(3):
        client.upload_urls(["a.csv"], None)
    assert sandbox.count("token") == 1


def test_a_short_token_is_refreshed_at_half_its_lifetime(sandbox, client):
    sandbox.token_seconds = 1
    client.token()
    wait_for(lambda: (client.token(), sandbox.count("token") == 2)[1], timeout=3)


def test_a_token_answer_without_expires_in_lasts_300_seconds(sandbox, client):
    sandbox.token_seconds = None
    client.token()
    assert client._token_expiry[1] == 300.0


def test_a_fixed_access_token_is_used_as_is(sandbox):
    token = sandbox.issue_token()["access_token"]
    api = ApiClient(
        make_settings(sandbox, None, client_id=None, client_secret=None, access_token=token)
    )
    try:
        assert isinstance(api.upload_urls(["a.csv"], None)["a.csv"], SignedUrl)
        sandbox.forget_tokens()
        with pytest.raises(Fault) as caught:
            api.upload_urls(["a.csv"], None)
    finally:
        api.close()
    assert caught.value.kind is Kind.SERVICE and caught.value.status == 401
    assert sandbox.count("token") == 0


def test_wrong_credentials_are_a_loud_service_fault(sandbox, client):
    sandbox.client_secret = "rotated"
    with pytest.raises(Fault) as caught:
        client.token()
    assert caught.value.kind is Kind.SERVICE
    assert "invalid_client" in caught.value.reason and "check client_id" in caught.value.reason


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ({"body": '{"access'}, "not JSON"),
        ({"body": "[1, 2]"}, "without an access_token"),
        ({"body": "{}"}, "without an access_token"),
        ({"status": 503}, "HTTP 503"),
        ({"drop": True}, "cannot reach the token endpoint"),
    ],
)
def test_bad_token_answers_are_service_faults(sandbox, client, fault, words):
    sandbox.inject("token", count=5, **fault)
    with pytest.raises(Fault) as caught:
        client.token()
    assert caught.value.kind is Kind.SERVICE and words in caught.value.reason


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ({"body": "not json"}, "not JSON"),
        ({"body": '["a.csv"]'}, "other than a map"),
        ({"status": 404}, "HTTP 404"),
    ],
)
def test_bad_url_answers_are_service_faults(sandbox, client, fault, words):
    client.token()
    sandbox.inject("urls", count=5, **fault)
    with pytest.raises(Fault) as caught:
        client.upload_urls(["a.csv"], None)
    assert caught.value.kind is Kind.SERVICE and words in caught.value.reason


def test_the_answer_keeps_only_the_names_asked_for(sandbox, client):
    sandbox.extra_names = {"unasked.csv"}
    sandbox.omit_names = {"b.csv"}
    answer = client.upload_urls(["a.csv", "b.csv", "c d+e.csv"], "users")
    assert set(answer) == {"a.csv", "c d+e.csv"}
    assert "c%20d%2Be.csv" in answer["c d+e.csv"].url  # type: ignore[union-attr]


def test_a_refused_name_is_a_refused_request_with_the_apis_words(sandbox, client):
    sandbox.refuse_names = {"x.csv"}
    with pytest.raises(Fault) as caught:
        client.upload_urls(["x.csv"], None)
    assert caught.value.kind is Kind.REFUSED and "invalid filename: x.csv" in caught.value.reason


def test_url_expiry_is_corrected_for_the_apis_clock(sandbox, client):
    sandbox.clock_offset = 3600  # the API's clock is an hour ahead of ours
    sandbox.url_seconds = 900
    url = client.upload_urls(["a.csv"], None)["a.csv"]
    assert isinstance(url, SignedUrl) and url.expires_at is not None
    assert abs(url.expires_at - (time.time() + 900)) < 3
