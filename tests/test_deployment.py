"""Checks of a running deployment, black-box, for an operator after an install or an upgrade.

    AIPIPE_BASE_URL=https://aipipe.example.org AIPIPE_ADMIN_TOKEN=<an admin's token> python -m pytest -m deployment

They touch no data but one tagged test user's (AIPIPE_CHECK_EMAIL, default aipipe-deployment-check@example.invalid),
make no paid provider call unless AIPIPE_CHECK_MODEL names an OpenAI model to call with max_tokens=1, and skip
when AIPIPE_BASE_URL is not set. tests/test_deployment_local.py runs them against a local server.
"""
from __future__ import annotations

import os

import pytest
import requests

BASE = os.environ.get("AIPIPE_BASE_URL", "").rstrip("/")
ADMIN = os.environ.get("AIPIPE_ADMIN_TOKEN", "")
EMAIL = os.environ.get("AIPIPE_CHECK_EMAIL", "aipipe-deployment-check@example.invalid")
pytestmark = [pytest.mark.deployment,
              pytest.mark.skipif(not BASE, reason="set AIPIPE_BASE_URL (and AIPIPE_ADMIN_TOKEN) to check a deployment")]


def get(path: str, token: str | None = None, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(BASE + path, headers=headers, timeout=30, **kw)


def assert_json_error(r: requests.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers.get("Access-Control-Allow-Origin") == "*"
    return r.json()["message"]


@pytest.fixture(scope="module")
def user_token() -> str:
    """The tagged test user's token, minted by the admin."""
    if not ADMIN:
        pytest.skip("set AIPIPE_ADMIN_TOKEN to an admin's AI Pipe token")
    r = get("/admin/token", ADMIN, params={"email": EMAIL})
    assert r.status_code == 200, r.text
    return r.json()["token"]


def test_the_server_is_healthy():
    r = get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_an_app_without_a_token_is_refused_with_json_and_cors():
    r = requests.post(BASE + "/openai/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []}, timeout=30)
    assert assert_json_error(r, 401).startswith("Missing Authorization")


def test_the_test_user_sees_their_usage(user_token):
    r = get("/usage", user_token)
    assert r.status_code == 200 and r.json()["email"] == EMAIL
    assert isinstance(r.json()["limit"], (int, float))


def test_a_path_that_could_be_reread_upstream_is_refused(user_token):
    r = requests.post(BASE + "/openai/v1/files/%2e%2e/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {user_token}"}, json={"model": "gpt-4o-mini", "messages": []})
    assert assert_json_error(r, 400).startswith("Path not allowed")


def test_proxy_answers_cannot_run_script_on_this_origin():
    r = get("/proxy/not-a-url")
    assert r.status_code >= 400
    assert "sandbox" in r.headers.get("Content-Security-Policy", "")
    assert r.headers.get("X-Content-Type-Options") == "nosniff"


def test_admins_can_read_the_test_users_ledger(user_token):
    r = get("/admin/usage", ADMIN, params={"email": EMAIL})
    assert r.status_code == 200 and isinstance(r.json()["data"], list)


def test_non_admins_are_refused_the_admin_api(user_token):
    assert assert_json_error(get("/admin/usage", user_token), 403) == "Admin access required"


@pytest.mark.skipif(not os.environ.get("AIPIPE_CHECK_MODEL"), reason="set AIPIPE_CHECK_MODEL for one paid call")
def test_a_paid_call_is_billed_to_the_test_user(user_token):
    before = get("/usage", user_token).json()["spent"]
    r = requests.post(BASE + "/openai/v1/chat/completions", headers={"Authorization": f"Bearer {user_token}"},
                      json={"model": os.environ["AIPIPE_CHECK_MODEL"], "max_tokens": 1,
                            "messages": [{"role": "user", "content": "Say OK"}]}, timeout=120)
    assert r.status_code == 200, r.text
    cost = float(r.headers["X-AIPipe-Cost"])
    assert cost > 0
    assert get("/usage", user_token).json()["spent"] == pytest.approx(before + cost, abs=1e-9)
