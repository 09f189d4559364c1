"""API keys and the dashboard access rules, as pure logic (no database)."""

from __future__ import annotations

import hashlib

from api.auth import KEY_PREFIX, Principal, Role, generate_key, hash_key
from api.dashboards.access import access_of, can_edit
from api.metadata.models import Dashboard, DashboardShare


def _principal(user_id: int, role: Role = Role.analyst, email: str | None = None) -> Principal:
    return Principal(key_id=user_id, user_id=user_id, email=email or f"u{user_id}@example.org", role=role)


def _dashboard(
    owner: int = 1, public: bool = False, prebuilt: str | None = None, shares: tuple[tuple[str, str], ...] = ()
) -> Dashboard:
    dashboard = Dashboard(id=10, name="d", owner_id=owner, is_public=public, prebuilt_slug=prebuilt)
    dashboard.shares = [DashboardShare(email=email, permission=perm) for email, perm in shares]
    return dashboard


def test_keys_are_random_and_stored_as_sha256() -> None:
    a, b = generate_key(), generate_key()
    assert a != b and a.startswith(KEY_PREFIX) and len(a) > 40
    assert hash_key(a) == hashlib.sha256(a.encode()).hexdigest()
    assert a not in hash_key(a)


def test_role_order() -> None:
    assert Role.admin.rank > Role.analyst.rank > Role.viewer.rank
    assert _principal(1, Role.admin).at_least(Role.analyst)
    assert not _principal(1, Role.viewer).at_least(Role.analyst)


def test_owner_share_public_and_stranger() -> None:
    private = _dashboard(shares=(("u2@example.org", "view"), ("u3@example.org", "edit")))
    assert access_of(private, _principal(1)) == "owner"
    assert access_of(private, _principal(2)) == "view"
    assert access_of(private, _principal(3)) == "edit"
    assert access_of(private, _principal(4)) is None
    assert access_of(private, _principal(4, Role.admin)) is None  # privacy follows the owner, not the role
    assert access_of(private, None) is None
    public = _dashboard(public=True)
    assert access_of(public, None) == "view" and access_of(public, _principal(4)) == "view"


def test_editing_needs_edit_access_and_the_analyst_role() -> None:
    shared = _dashboard(shares=(("u3@example.org", "edit"),))
    assert can_edit(access_of(shared, _principal(3)), _principal(3))
    viewer = _principal(3, Role.viewer)
    assert not can_edit(access_of(shared, viewer), viewer)
    assert not can_edit(access_of(shared, _principal(2)), _principal(2))
    assert not can_edit("view", None)


def test_prebuilt_read_by_all_edited_by_admins() -> None:
    prebuilt = _dashboard(prebuilt="executive")
    assert access_of(prebuilt, _principal(5, Role.viewer)) == "view"
    admin = _principal(6, Role.admin)
    assert access_of(prebuilt, admin) == "edit" and can_edit("edit", admin)
    assert access_of(prebuilt, None) is None
