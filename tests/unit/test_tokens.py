"""Token lifecycle: list, create (with an expiry) and revoke, through ``/v1/admin/tokens`` and
``shipyard admin``; an expired token is refused like a revoked one, a revocation through the
server is immediate, one from elsewhere lands within the cache TTL (FastAPI's TestClient over a
SQLite store; the CLI in-process)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from shipyard.api import ApiConfig, create_app
from shipyard.errors import UserError
from shipyard.store import Store
from shipyard.store import tenancy
from shipyard.store.tenancy import token_lifetime

from inprocess_cli import shipyard


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'shipyard.db'}"


@pytest.fixture
def api(db):
    store = Store.open(db)
    store.create_tenant("a")
    store.create_tenant("b")
    client = TestClient(create_app(store, config=ApiConfig(report_key=b"k")))
    client.admin = store.create_token("a", admin=True, label="ops")[0]
    client.user = store.create_token("a", label="alice")[0]
    client.store = store
    yield client
    store.close()


def h(token):
    return {"Authorization": f"Bearer {token}"}


def error(r, status, *words):
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message and all(w in message for w in words), message
    return message


# -- durations ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("90d", 90 * 86_400), ("12h", 12 * 3600), ("30m", 1800),
                                           ("1m", 60), ("3650d", 3650 * 86_400)])
def test_a_lifetime_is_whole_days_hours_or_minutes(text, seconds):
    assert token_lifetime(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["3651d", "87601h", "5y", "0m", "30s", "1.5d", "-1d", "90", "", "d", "9" * 40])
def test_a_lifetime_out_of_bounds_or_not_a_duration_is_refused_naming_the_option_and_the_limit(text):
    with pytest.raises(UserError) as e:
        token_lifetime(text, "--expires-in")
    message = str(e.value)
    assert message.startswith("--expires-in: got ") and "3650d" in message and "\n" not in message


# -- the routes -----------------------------------------------------------------------------

def test_admin_routes_need_an_admin_token(api):
    for method, path, body in (("get", "/v1/admin/tokens", None), ("post", "/v1/admin/tokens", {"tenant": "a"}),
                               ("post", "/v1/admin/tokens/1/revoke", None)):
        call = getattr(api, method)
        kwargs = {"json": body} if body else {}
        error(call(path, **kwargs), 401, "missing bearer token")
        error(call(path, headers=h(api.user), **kwargs), 403, "admin token")
    assert api.store.get_token(1).revoked_at is None


def test_listing_shows_every_token_without_its_secret_and_pages_by_id(api):
    r = api.get("/v1/admin/tokens", headers=h(api.admin))
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [(t["tenant"], t["role"], t["label"], t["state"]) for t in items] == [("a", "admin", "ops", "active"),
                                                                                 ("a", "user", "alice", "active")]
    assert set(items[0]) == {"id", "tenant", "role", "label", "created_at", "expires_at", "revoked_at", "state"}
    assert api.admin not in r.text and api.user not in r.text and r.json()["next_after"] is None
    first = api.get("/v1/admin/tokens", params={"limit": 1}, headers=h(api.admin)).json()
    assert len(first["items"]) == 1 and first["next_after"] == items[0]["id"]
    rest = api.get("/v1/admin/tokens", params={"after": first["next_after"]}, headers=h(api.admin)).json()
    assert [t["id"] for t in rest["items"]] == [items[1]["id"]]
    assert api.get("/v1/admin/tokens", params={"tenant": "b"}, headers=h(api.admin)).json()["items"] == []
    error(api.get("/v1/admin/tokens", params={"tenant": "typo"}, headers=h(api.admin)), 404, "no tenant 'typo'")


@pytest.mark.parametrize("params", [{"tenant": "x" * 64}, {"limit": 0}, {"limit": 1001}, {"after": -1},
                                    {"after": 2**63}])
def test_listing_query_strings_are_bounded(api, params):
    assert api.get("/v1/admin/tokens", params=params, headers=h(api.admin)).status_code == 422


def test_a_created_token_is_answered_once_works_and_expires_when_asked(api):
    r = api.post("/v1/admin/tokens", json={"tenant": "b", "label": "ci", "expires_in": "12h"}, headers=h(api.admin))
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["token"].startswith("shp_") and (made["tenant"], made["role"], made["state"]) == ("b", "user", "active")
    created, expires = (datetime.fromisoformat(made[k]) for k in ("created_at", "expires_at"))
    assert expires - created == timedelta(hours=12)
    assert api.get("/v1/jobs", headers=h(made["token"])).status_code == 200
    listed = api.get("/v1/admin/tokens", params={"tenant": "b"}, headers=h(api.admin)).json()["items"]
    assert listed == [{k: v for k, v in made.items() if k != "token"}]
    admin = api.post("/v1/admin/tokens", json={"tenant": "b", "role": "admin"}, headers=h(api.admin)).json()
    assert admin["role"] == "admin" and admin["expires_at"] is None
    assert api.get("/v1/admin/tokens", headers=h(admin["token"])).status_code == 200


@pytest.mark.parametrize("body, status, words", [
    ({"tenant": "typo"}, 404, ("no tenant 'typo'", "create-tenant")),  # the API never creates a tenant
    ({"tenant": "Bad_Name"}, 400, ("tenant: got 'Bad_Name'",)),
    ({"tenant": "a", "expires_in": "3651d"}, 400, ("expires_in: got '3651d'", "3650d")),
    ({"tenant": "a", "expires_in": "soon"}, 400, ("expires_in: got 'soon'",)),
    ({"tenant": "a", "label": "a\x00b"}, 400, ("label: must be printable",)),
])
def test_a_bad_create_is_refused_in_one_line(api, body, status, words):
    error(api.post("/v1/admin/tokens", json=body, headers=h(api.admin)), status, *words)


@pytest.mark.parametrize("body", [{"tenant": "a", "role": "root"}, {"tenant": "a", "label": "x" * 201},
                                  {"tenant": "a", "secret": "shp_mine"}, {"tenant": "x" * 64}, {}])
def test_a_malformed_create_body_is_a_422(api, body):
    assert api.post("/v1/admin/tokens", json=body, headers=h(api.admin)).status_code == 422


def test_a_revocation_through_the_server_is_refused_from_the_next_request(api):
    assert api.get("/v1/jobs", headers=h(api.user)).status_code == 200  # now cached for TOKEN_CACHE_S
    user_id = api.store.authenticate(api.user).id
    r = api.post(f"/v1/admin/tokens/{user_id}/revoke", headers=h(api.admin))
    assert r.status_code == 200 and r.json()["state"] == "revoked", r.text
    error(api.get("/v1/jobs", headers=h(api.user)), 401, "invalid or revoked token")
    again = api.post(f"/v1/admin/tokens/{user_id}/revoke", headers=h(api.admin)).json()
    assert again["revoked_at"] == r.json()["revoked_at"]  # a no-op: the first revocation's time is kept
    error(api.post("/v1/admin/tokens/999/revoke", headers=h(api.admin)), 404, "no token with id 999")
    assert api.post("/v1/admin/tokens/0/revoke", headers=h(api.admin)).status_code == 422


def test_a_revocation_elsewhere_lands_within_the_cache_ttl(api, db, monkeypatch):
    with Store.open(db) as other:  # another replica, or `shipyard admin revoke-token` (opened first: that
        assert api.get("/v1/jobs", headers=h(api.user)).status_code == 200  # may take longer than the TTL)
        other.revoke_token(other.authenticate(api.user).id)
        assert api.get("/v1/jobs", headers=h(api.user)).status_code == 200  # this replica's cache, < 5 s old
    monkeypatch.setattr("shipyard.api.auth.TOKEN_CACHE_S", 0.0)  # the TTL has passed
    error(api.get("/v1/jobs", headers=h(api.user)), 401)


def test_an_expired_token_is_refused_even_from_the_cache(api, monkeypatch):
    made = api.post("/v1/admin/tokens", json={"tenant": "a", "expires_in": "30m"}, headers=h(api.admin)).json()
    assert api.get("/v1/jobs", headers=h(made["token"])).status_code == 200  # cached
    later = datetime.now(timezone.utc) + timedelta(minutes=31)
    monkeypatch.setattr(tenancy, "_now", lambda: later)
    error(api.get("/v1/jobs", headers=h(made["token"])), 401, "expired")
    assert api.store.authenticate(made["token"]) is None  # and from the database
    listed = api.get("/v1/admin/tokens", headers=h(api.admin)).json()["items"]
    assert [t["state"] for t in listed if t["id"] == made["id"]] == ["expired"]


# -- the CLI --------------------------------------------------------------------------------

def test_create_token_refuses_an_unknown_tenant_unless_told_to_create_it(capsys, monkeypatch, db):
    code, out, err = shipyard(capsys, monkeypatch, "admin", "create-token", "--tenant", "typo", "--database-url", db)
    assert (code, out) == (2, "")
    assert err.strip() == ("error: tenant 'typo' does not exist; create it with `shipyard admin create-tenant typo` "
                           "or pass --create-tenant")
    code, out, err = shipyard(capsys, monkeypatch, "admin", "create-token", "--tenant", "typo", "--create-tenant",
                              "--expires-in", "90d", "--label", "ci", "--database-url", db)
    assert code == 0 and out.startswith("shp_") and len(out.splitlines()) == 1, err
    assert "token 1 (user of tenant typo, expires " in err
    with Store.open(db) as store:
        record = store.authenticate(out.strip())
        assert record.tenant == "typo" and record.expires_at - record.created_at == timedelta(days=90)


@pytest.mark.parametrize("args, line", [
    (("--expires-in", "3651d"), "error: --expires-in: got '3651d'; expected a whole number of days, hours or minutes "
                                "(e.g. 90d, 12h, 30m), at least 1m and at most 3650d"),
    (("--role", "root"), "error: --role: got 'root'; expected user or admin"),
    (("--label", "x" * 201), "error: --label: must be printable text of at most 200 characters"),
])
def test_create_token_refuses_bad_options_in_one_line(capsys, monkeypatch, db, args, line):
    with Store.open(db) as store:
        store.create_tenant("a")
    code, out, err = shipyard(capsys, monkeypatch, "admin", "create-token", "--tenant", "a", *args, "--database-url", db)
    assert (code, out, err.strip()) == (2, "", line)


def test_list_and_revoke_tokens_from_the_cli(capsys, monkeypatch, db):
    with Store.open(db) as store:
        store.create_tenant("a")
        secret, tok = store.create_token("a", label="[red]alice")
    code, out, _ = shipyard(capsys, monkeypatch, "admin", "list-tokens", "-o", "json", "--database-url", db)
    listed = json.loads(out)
    assert code == 0 and [(t["id"], t["label"], t["state"]) for t in listed] == [(tok.id, "[red]alice", "active")]
    assert secret not in out
    code, out, _ = shipyard(capsys, monkeypatch, "admin", "list-tokens", "--tenant", "a", "--database-url", db)
    assert code == 0 and "[red]alice" in out and "never" in out and len(out.splitlines()) == 2
    code, out, _ = shipyard(capsys, monkeypatch, "admin", "revoke-token", str(tok.id), "--database-url", db)
    assert code == 0 and out.strip() == (f"token {tok.id} (user of tenant a, [red]alice) revoked; a running server "
                                         "refuses it within 5 s")
    code, out, _ = shipyard(capsys, monkeypatch, "admin", "revoke-token", str(tok.id), "--database-url", db)
    assert code == 0 and "was already revoked at" in out
    with Store.open(db) as store:
        assert store.authenticate(secret) is None
    code, _, err = shipyard(capsys, monkeypatch, "admin", "revoke-token", "99", "--database-url", db)
    assert (code, err.strip()) == (2, "error: no token with id 99 (shipyard admin list-tokens shows them)")
    code, _, err = shipyard(capsys, monkeypatch, "admin", "list-tokens", "--tenant", "typo", "--database-url", db)
    assert (code, err.strip()) == (2, "error: no tenant 'typo'; create it first (shipyard admin create-tenant typo)")


def test_the_help_names_the_config_file_and_when_a_revocation_lands(capsys, monkeypatch):
    _, out, _ = shipyard(capsys, monkeypatch, "--help")
    assert "~/.shipyard/config.yaml" in " ".join(out.split())
    _, out, _ = shipyard(capsys, monkeypatch, "admin", "revoke-token", "--help")
    assert "for up to 5 s more" in " ".join(out.replace("│", " ").split())
