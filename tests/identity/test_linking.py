"""Provider groups to labgate groups and admin, on a real database."""

from __future__ import annotations

from labgate.config import IdentityProviderConfig
from labgate.db.models import Group, GroupMember, User
from labgate.db.session import Database
from labgate.identity.base import clean_username
from labgate.identity.linking import apply_groups


def test_admin_groups_follow_the_provider_but_never_remove_the_last_admin(database_url):
    config = IdentityProviderConfig(
        name="uni", kind="oidc", admin_groups=["admins"], group_map={"phys": "physics"}
    )
    db = Database(database_url)
    try:
        db.migrate()
        with db.session() as session:
            ada = User(name="ada", is_admin=True)
            session.add(ada)
            session.flush()
            apply_groups(session, config, ada, frozenset({"phys"}))
            assert ada.is_admin  # the last enabled admin keeps the rights
            physics = session.query(Group).filter_by(name="physics").one()
            assert session.get(GroupMember, (physics.id, ada.id)) is not None
            session.add(User(name="root2", is_admin=True))
            session.flush()
            apply_groups(session, config, ada, frozenset())
            assert not ada.is_admin  # another admin exists: the provider decides
            assert session.get(GroupMember, (physics.id, ada.id)) is None
            apply_groups(session, config, ada, frozenset({"admins"}))
            assert ada.is_admin
    finally:
        db.dispose()


def test_provider_names_become_labgate_names() -> None:
    assert clean_username("Alice.Smith@Uni.Example") == "alice.smith"
    assert clean_username("42 people") == "u42-people"
    assert clean_username("") == "user"
    assert len(clean_username("x" * 100)) <= 28
