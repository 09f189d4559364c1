"""Dashboards CRUD, sharing and who may see or change what, over HTTP against the real metadata database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from tests.integration.query_api_support import Keys, build_app, close, make_keys

pytestmark = pytest.mark.integration

WIDGET = {
    "title": "Signups",
    "widget_type": "line",
    "data_source": {"kind": "metric", "metric": "signups"},
    "position": {"x": 0, "y": 0, "w": 6, "h": 4},
    "refresh_seconds": 60,
}


@pytest.fixture
def api(ch_db: Client, tmp_path: Path) -> Iterator[tuple[TestClient, Keys]]:
    app = build_app(ch_db, tmp_path)
    with TestClient(app) as client:
        yield client, make_keys(app)
    close(app)


def _create(client: TestClient, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    body = {"name": "Growth", "widgets": [WIDGET], **fields}
    response = client.post("/v1/dashboards", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_crud_duplicate_and_layout(api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    created = _create(client, keys.ana, layout={"columns": 12}, default_filters={"range": "last_7_days"})
    assert created["permission"] == "owner" and created["owner_email"] == "ana@example.org"
    assert created["widgets"][0]["position"] == {"x": 0, "y": 0, "w": 6, "h": 4}
    dash_id = created["id"]

    patched = client.patch(f"/v1/dashboards/{dash_id}", json={"name": "Growth v2"}, headers=keys.ana)
    assert patched.status_code == 200 and patched.json()["name"] == "Growth v2"

    added = client.post(
        f"/v1/dashboards/{dash_id}/widgets",
        headers=keys.ana,
        json={
            **WIDGET,
            "title": "Fees",
            "widget_type": "metric_card",
            "data_source": {"kind": "metric", "metric": "processing_fees"},
        },
    )
    assert added.status_code == 201
    wid = added.json()["id"]
    moved = client.patch(
        f"/v1/dashboards/{dash_id}/widgets/{wid}", headers=keys.ana, json={"position": {"x": 6, "y": 0, "w": 3, "h": 2}}
    )
    assert moved.json()["position"] == {"x": 6, "y": 0, "w": 3, "h": 2}

    copy = client.post(f"/v1/dashboards/{dash_id}/duplicate", headers=keys.bob, json={"name": "Mine"})
    assert copy.status_code == 404  # bob cannot see ana's private dashboard, so he cannot copy it
    copy = client.post(f"/v1/dashboards/{dash_id}/duplicate", headers=keys.ana)
    assert copy.status_code == 201
    assert copy.json()["name"] == "Growth v2 (copy)" and len(copy.json()["widgets"]) == 2
    assert copy.json()["id"] != dash_id

    assert client.delete(f"/v1/dashboards/{dash_id}/widgets/{wid}", headers=keys.ana).status_code == 204
    assert len(client.get(f"/v1/dashboards/{dash_id}", headers=keys.ana).json()["widgets"]) == 1
    assert client.delete(f"/v1/dashboards/{dash_id}", headers=keys.ana).status_code == 204
    missing = client.get(f"/v1/dashboards/{dash_id}", headers=keys.ana)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_list_is_paginated_and_private_dashboards_stay_private(api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    mine = [_create(client, keys.ana, name=f"ana {i}")["id"] for i in range(3)]
    _create(client, keys.bob, name="bob private")
    public = _create(client, keys.bob, name="bob public", is_public=True)["id"]

    page = client.get("/v1/dashboards", params={"limit": 2, "offset": 0}, headers=keys.ana).json()
    assert page["limit"] == 2 and len(page["items"]) == 2
    every = client.get("/v1/dashboards", params={"limit": 500}, headers=keys.ana).json()
    names = {d["name"] for d in every["items"]}
    assert every["total"] == len(every["items"])
    assert "bob private" not in names and "bob public" in names
    assert {d["id"] for d in every["items"]} >= set(mine) | {public}
    # Even an admin key does not see another owner's private dashboard.
    admin_names = {
        d["name"] for d in client.get("/v1/dashboards", params={"limit": 500}, headers=keys.admin).json()["items"]
    }
    assert "bob private" not in admin_names and "ana 0" not in admin_names


def test_viewer_cannot_edit_or_create(api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    dash = _create(client, keys.ana)
    assert client.post("/v1/dashboards", json={"name": "x"}, headers=keys.vic).status_code == 403
    share = client.post(
        f"/v1/dashboards/{dash['id']}/shares", json={"email": "vic@example.org", "permission": "edit"}, headers=keys.ana
    )
    assert share.status_code == 201
    # Even with an edit share, the viewer role caps the key at reading.
    assert client.get(f"/v1/dashboards/{dash['id']}", headers=keys.vic).status_code == 200
    refused = client.patch(f"/v1/dashboards/{dash['id']}", json={"name": "mine now"}, headers=keys.vic)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"


def test_shares_grant_view_or_edit_and_are_unique(api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    dash_id = _create(client, keys.ana)["id"]
    url = f"/v1/dashboards/{dash_id}"

    assert client.get(url, headers=keys.bob).status_code == 404  # no share: it does not exist for bob
    view = client.post(f"{url}/shares", json={"email": "BOB@example.org", "permission": "view"}, headers=keys.ana)
    assert view.status_code == 201 and view.json()["email"] == "bob@example.org"
    assert client.get(url, headers=keys.bob).json()["permission"] == "view"
    assert client.patch(url, json={"name": "bob's"}, headers=keys.bob).status_code == 403
    assert client.post(f"{url}/widgets", json=WIDGET, headers=keys.bob).status_code == 403

    again = client.post(f"{url}/shares", json={"email": "bob@example.org", "permission": "edit"}, headers=keys.ana)
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"

    assert client.delete(f"{url}/shares/{view.json()['id']}", headers=keys.ana).status_code == 204
    edit = client.post(f"{url}/shares", json={"email": "bob@example.org", "permission": "edit"}, headers=keys.ana)
    assert edit.status_code == 201
    changed = client.patch(url, json={"name": "edited by bob"}, headers=keys.bob)
    assert changed.status_code == 200 and changed.json()["permission"] == "edit"
    assert client.post(f"{url}/widgets", json=WIDGET, headers=keys.bob).status_code == 201
    # An editor is not the owner: no deleting, no re-sharing.
    assert client.delete(url, headers=keys.bob).status_code == 403
    assert client.post(f"{url}/shares", json={"email": "eve@example.org"}, headers=keys.bob).status_code == 403
    assert client.get(url, headers=keys.eve).status_code == 404


def test_public_dashboards_read_anonymously(api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    private = _create(client, keys.ana)["id"]
    public = _create(client, keys.ana, is_public=True)["id"]
    assert client.get(f"/v1/dashboards/{private}").status_code == 404
    body = client.get(f"/v1/dashboards/{public}").json()
    assert body["permission"] == "view" and body["widgets"][0]["title"] == "Signups"
    assert client.patch(f"/v1/dashboards/{public}", json={"name": "x"}).status_code == 401
    assert client.get("/v1/dashboards").status_code == 401
    bad = client.get(f"/v1/dashboards/{public}", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"


def test_prebuilt_are_readable_by_all_and_editable_by_admins(api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    listed = client.get("/v1/dashboards", headers=keys.vic).json()["items"]
    prebuilt = {d["prebuilt"]: d for d in listed if d["prebuilt"]}
    assert set(prebuilt) == {"executive", "financial", "community", "projects"}
    exec_id = prebuilt["executive"]["id"]
    assert client.patch(f"/v1/dashboards/{exec_id}", json={"name": "x"}, headers=keys.ana).status_code == 403
    assert (
        client.patch(f"/v1/dashboards/{exec_id}", json={"description": "ours"}, headers=keys.admin).status_code == 200
    )
    copy = client.post(f"/v1/dashboards/{exec_id}/duplicate", headers=keys.ana)
    assert copy.status_code == 201 and copy.json()["prebuilt"] is None and copy.json()["permission"] == "owner"


def test_keys_roles_and_revocation(api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    me = client.get("/v1/me", headers=keys.bob).json()
    assert me["email"] == "bob@example.org" and me["role"] == "analyst"
    assert client.post("/v1/keys", json={"role": "admin"}, headers=keys.bob).status_code == 403
    assert client.post("/v1/keys", json={"owner_email": "x@example.org"}, headers=keys.bob).status_code == 403
    new = client.post(
        "/v1/keys", json={"role": "viewer", "owner_email": "zoe@example.org", "name": "zoe"}, headers=keys.admin
    )
    assert new.status_code == 201
    secret = new.json()["key"]
    zoe = {"X-API-Key": secret}
    assert client.get("/v1/me", headers=zoe).json()["email"] == "zoe@example.org"
    listed = client.get("/v1/keys", headers=keys.admin).json()
    assert listed["total"] >= 6 and all("key" not in k for k in listed["items"])
    assert [k["owner_email"] for k in client.get("/v1/keys", headers=zoe).json()["items"]] == ["zoe@example.org"]
    assert client.delete(f"/v1/keys/{new.json()['id']}", headers=keys.bob).status_code == 404
    assert client.delete(f"/v1/keys/{new.json()['id']}", headers=keys.admin).status_code == 204
    assert client.get("/v1/me", headers=zoe).status_code == 401
    last_admin = client.get("/v1/me", headers=keys.admin).json()["key_id"]
    refused = client.delete(f"/v1/keys/{last_admin}", headers=keys.admin)
    assert refused.status_code == 409 and client.get("/v1/me", headers=keys.admin).status_code == 200


def test_bad_widget_source_is_a_clear_400(api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    bad = client.post(
        "/v1/dashboards", headers=keys.ana, json={"name": "x", "widgets": [{**WIDGET, "data_source": {"kind": "nope"}}]}
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/dashboards/{id}"),
        ("PATCH", "/v1/dashboards/{id}"),
        ("DELETE", "/v1/dashboards/{id}"),
        ("POST", "/v1/dashboards/{id}/duplicate"),
        ("GET", "/v1/dashboards/1/widgets/{id}/data"),
        ("DELETE", "/v1/dashboards/1/shares/{id}"),
        ("DELETE", "/v1/keys/{id}"),
    ],
)
def test_ids_beyond_the_database_integer_are_a_400(api: tuple[TestClient, Keys], method: str, path: str) -> None:
    # The metadata database cannot even be asked about 2**63 (its driver overflows); it was a 500.
    client, keys = api
    response = client.request(method, path.format(id=2**63), headers=keys.admin, json={"name": "x"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert "less than or equal to 2147483647" in response.json()["error"]["message"]


def test_a_widget_cannot_name_a_saved_query_id_beyond_the_database_integer(api: tuple[TestClient, Keys]) -> None:
    client, keys = api
    source = {"kind": "analysis", "saved_query_id": 2**63}
    bad = client.post(
        "/v1/dashboards", headers=keys.ana, json={"name": "x", "widgets": [{**WIDGET, "data_source": source}]}
    )
    assert bad.status_code == 400 and "saved_query_id" in bad.json()["error"]["message"]


def test_default_filters_are_dates_or_instants_with_their_offset(api: tuple[TestClient, Keys]) -> None:
    # A date-time without an offset was stored and returned as such: not RFC 3339, so the
    # response broke its own schema (found by the OpenAPI fuzz test with 0147-05-23T00:00:00).
    client, keys = api
    kept = _create(client, keys.ana, default_filters={"start": "2026-03-01", "end": "2026-03-08T00:00:00+02:00"})
    stored = kept["default_filters"]
    assert (stored["start"], stored["end"]) == ("2026-03-01", "2026-03-08T00:00:00+02:00")
    midnight = _create(client, keys.ana, default_filters={"start": "0147-05-23T00:00:00"})
    assert midnight["default_filters"]["start"] == "0147-05-23"  # a local midnight is that local day
    naive = client.post(
        "/v1/dashboards", headers=keys.ana, json={"name": "x", "default_filters": {"start": "2026-03-08T10:00:00"}}
    )
    assert naive.status_code == 400 and "timezone" in naive.json()["error"]["message"]
    widget = kept["widgets"][0]["id"]
    data = client.get(
        f"/v1/dashboards/{kept['id']}/widgets/{widget}/data", headers=keys.ana, params={"start": "2026-03-08T10:00:00"}
    )
    assert data.status_code == 400 and "timezone" in data.json()["error"]["message"]
