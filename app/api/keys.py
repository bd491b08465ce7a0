"""API keys (admin only): create (the key is in the answer, once), list, revoke."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam

from app import auth
from app.api.deps import AdminAccess, AdminPrincipal, JsonBody, SessionDep, principal_cache
from app.schemas import INT32_MAX, ApiKeyCreate, ApiKeyCreated, ApiKeyList, ApiKeyPublic

router = APIRouter(prefix="/keys", tags=["keys"])

KeyId = Annotated[int, PathParam(ge=1, le=INT32_MAX, description="The key's id.")]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No API key, or an unknown one (`unauthorized`)."},
    403: {"description": "The key is not an admin key (`forbidden`)."},
}


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyCreated,
    dependencies=[AdminAccess, JsonBody],
    responses={**ERRORS, 409: {"description": "The name is taken (`key_name_taken`)."}},
)
def create_key(body: ApiKeyCreate, session: SessionDep, _: AdminPrincipal) -> ApiKeyCreated:
    """The answer holds the key itself; it is not stored and cannot be shown again."""
    created = auth.create_key(session, body.name, body.scopes)
    return ApiKeyCreated(**ApiKeyPublic.from_row(created.row).model_dump(), key=created.key)


@router.get("", response_model=ApiKeyList, responses=ERRORS)
def list_keys(session: SessionDep, _: AdminPrincipal) -> ApiKeyList:
    return ApiKeyList(keys=[ApiKeyPublic.from_row(row) for row in auth.list_keys(session)])


@router.delete(
    "/{key_id}",
    response_model=ApiKeyPublic,
    responses={
        **ERRORS,
        404: {"description": "No such key (`key_not_found`)."},
        409: {"description": "The key of this very request (`key_in_use`)."},
    },
)
def revoke_key(
    key_id: KeyId, request: Request, session: SessionDep, principal: AdminPrincipal
) -> ApiKeyPublic:
    """Revoke at once (the next request with it is 401); revoking twice is harmless."""
    row = auth.revoke_key(session, key_id, by=principal)
    # /predict's cached principal: in this process at once (the others hear of it through
    # app.notices on PostgreSQL, or let it expire within AUTH_CACHE_S).
    principal_cache(request).revoked(row.id)
    return ApiKeyPublic.from_row(row)
