"""The model registry: registered names, their versions, aliases, and the .keras artifacts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.deps import JsonBody, SessionDep, SettingsDep
from app.errors import ArtifactMissing, ModelNotFound
from app.models import ModelVersion
from app.registry import versions as registry
from app.registry.store import LocalArtifactStore
from app.schemas import (
    ALIAS_PATTERN,
    INT32_MAX,
    MODEL_NAME_PATTERN,
    AliasPublic,
    AliasUpdate,
    ModelList,
    ModelSummary,
    ModelVersionPublic,
    RegisteredModelPublic,
)

router = APIRouter(prefix="/models", tags=["models"])

Name = Annotated[str, PathParam(pattern=MODEL_NAME_PATTERN, description="Registered name.")]
Alias = Annotated[str, PathParam(pattern=ALIAS_PATTERN, description="e.g. production")]
Version = Annotated[int, PathParam(ge=1, le=INT32_MAX)]


def _public(row: ModelVersion, aliases: dict[str, int]) -> ModelVersionPublic:
    public = ModelVersionPublic.model_validate(row)
    public.aliases = sorted(alias for alias, version in aliases.items() if version == row.version)
    return public


def _versions_or_404(session: Session, name: str) -> list[ModelVersion]:
    versions = registry.list_versions(session, name)
    if not versions:
        raise ModelNotFound(f"no registered model named {name!r}")
    return versions


def _version_or_404(session: Session, name: str, version: int) -> ModelVersion:
    _versions_or_404(session, name)
    return registry.get_version(session, name, version)


@router.get("", response_model=ModelList)
def list_models(session: SessionDep) -> ModelList:
    """Every registered name with its latest version and its aliases."""
    models = []
    for name in registry.list_names(session):
        versions = registry.list_versions(session, name)
        aliases = registry.list_aliases(session, name)
        models.append(
            ModelSummary(
                name=name,
                latest_version=_public(versions[-1], aliases),
                versions=len(versions),
                aliases=aliases,
            )
        )
    return ModelList(models=models)


@router.get(
    "/{name}",
    response_model=RegisteredModelPublic,
    responses={404: {"description": "No such registered name (`model_not_found`)."}},
)
def get_model(name: Name, session: SessionDep) -> RegisteredModelPublic:
    versions = _versions_or_404(session, name)
    aliases = registry.list_aliases(session, name)
    return RegisteredModelPublic(
        name=name,
        latest_version=versions[-1].version,
        aliases=aliases,
        versions=[_public(row, aliases) for row in versions],
    )


@router.put(
    "/{name}/aliases/{alias}",
    response_model=AliasPublic,
    dependencies=[JsonBody],
    responses={404: {"description": "No such name or version (`model_not_found`)."}},
)
def set_alias(
    name: Name, alias: Alias, body: AliasUpdate, session: SessionDep, request: Request
) -> AliasPublic:
    """Point `name@alias` at a version; moving an alias is one UPDATE, never a gap."""
    _version_or_404(session, name, body.version)
    try:
        row = registry.set_alias(session, name, alias, body.version)
        session.commit()
    except IntegrityError:
        # Another request created the same alias first; ours becomes a plain move.
        session.rollback()
        row = registry.set_alias(session, name, alias, body.version)
        session.commit()
    # This process's /predict serves the new target from the next request on.
    request.app.state.prediction.registry.invalidate(name)
    return AliasPublic.model_validate(row)


@router.get(
    "/{name}/versions/{version}/artifact",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The .keras file."},
        404: {"description": "No such version, or its file is gone (`artifact_missing`)."},
    },
)
def download_artifact(
    name: Name, version: Version, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    row = _version_or_404(session, name, version)
    path = LocalArtifactStore.from_settings(settings).local_path(row.artifact_path)
    if not path.is_file():
        raise ArtifactMissing(f"the artifact file of {name} version {version} is missing")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{name}-v{version}.keras",
        headers={"ETag": f'"{row.sha256}"', "X-Checksum-Sha256": row.sha256},
    )
