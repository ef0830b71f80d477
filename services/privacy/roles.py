"""Which role may do what with personal data. API keys carry a role (services/ingest/keys.py Role); the
command line acts as the operator, who holds the secrets anyway (docs/privacy.md)."""

from __future__ import annotations

from typing import Literal

from services.ingest.keys import ApiKey, Role

Action = Literal["read_personal", "export", "erase", "rotate_master_key"]
OPERATOR = "operator"  # the role of `crm privacy` on the platform's own machine

# action -> roles allowed to do it
PERMISSIONS: dict[str, frozenset[str]] = {
    "read_personal": frozenset({Role.SUPPORT.value, Role.PRIVACY_OFFICER.value, OPERATOR}),
    "export": frozenset({Role.SUPPORT.value, Role.PRIVACY_OFFICER.value, OPERATOR}),
    "erase": frozenset({Role.PRIVACY_OFFICER.value, OPERATOR}),
    "rotate_master_key": frozenset({OPERATOR}),
}


def role_of(key: ApiKey) -> str:
    """The key's role as the audit names it: `none:<source>` for a key without one (a POS or app key)."""
    return key.role.value or f"none:{key.source.value}"


def may(role: str, action: str) -> bool:
    return role in PERMISSIONS.get(action, frozenset())


def refusal(role: str, action: str) -> str:
    needed = " or ".join(sorted(r for r in PERMISSIONS.get(action, ()) if r != OPERATOR))
    return f"a key with role {role!r} may not {action.replace('_', ' ')}; it needs the role {needed}"
