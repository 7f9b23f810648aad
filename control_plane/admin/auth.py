"""Who is calling the admin API, and what they may touch.

Roles: ``platform-admin`` (everything), ``tenant-admin`` (read and write within a tenant),
``tenant-viewer`` (read within a tenant). A tenant the caller may not read is reported as
NOT_FOUND, so callers cannot probe for other tenants' names or ids.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import AdminCredential, Principal
from tessera import keys
from tessera.errors import PermissionDeniedError, UnauthenticatedError

PLATFORM_ADMIN = "platform-admin"
TENANT_ADMIN = "tenant-admin"
TENANT_VIEWER = "tenant-viewer"
ROLES = (PLATFORM_ADMIN, TENANT_ADMIN, TENANT_VIEWER)
LOCAL_ADMIN_ID = "local-admin"


@dataclass(frozen=True, slots=True)
class Caller:
    principal_id: str
    name: str
    platform_admin: bool = False
    tenant_roles: Mapping[str, str] = field(default_factory=dict)  # tenant id -> strongest role

    def can_read(self, tenant_id: str | None) -> bool:
        return self.platform_admin or (tenant_id is not None and tenant_id in self.tenant_roles)

    def can_write(self, tenant_id: str | None) -> bool:
        return self.platform_admin or (
            tenant_id is not None and self.tenant_roles.get(tenant_id) == TENANT_ADMIN
        )

    @property
    def readable_tenants(self) -> frozenset[str] | None:
        """None means every tenant."""
        return None if self.platform_admin else frozenset(self.tenant_roles)

    def require_platform(self, what: str) -> None:
        if not self.platform_admin:
            raise PermissionDeniedError(f"{what} requires the platform-admin role")


def caller_from_principal(p: Principal) -> Caller:
    roles: dict[str, str] = {}
    platform = False
    for b in p.bindings:
        if b.role == PLATFORM_ADMIN:
            platform = True
        elif b.tenant_id is not None and (b.role == TENANT_ADMIN or b.tenant_id not in roles):
            roles[b.tenant_id] = b.role
    return Caller(p.id, p.name, platform, roles)


class Authenticator:
    def __init__(self, pepper: bytes, local_token: str) -> None:
        self._pepper = pepper
        self._local = local_token.encode()

    async def authenticate(self, session: AsyncSession, authorization: str) -> Caller:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("missing admin credential: send 'authorization: Bearer <token>'")
        if self._local and hmac.compare_digest(token.encode(), self._local):
            return Caller(LOCAL_ADMIN_ID, LOCAL_ADMIN_ID, platform_admin=True)
        if keys.parse_public_id(token, kind=keys.ADMIN_KEY) is None:
            raise UnauthenticatedError("invalid admin credential")
        # A lookup by the full 32-byte HMAC: the caller controls the input, never the stored digest.
        cred = await session.scalar(
            select(AdminCredential).where(
                AdminCredential.digest == keys.digest(self._pepper, token),
                AdminCredential.revoked_at.is_(None),
            )
        )
        if cred is None or cred.principal.status != "active":
            raise UnauthenticatedError("invalid admin credential")
        return caller_from_principal(cred.principal)
