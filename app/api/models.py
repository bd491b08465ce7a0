"""The model registry: registered names, their versions, aliases, and the .keras artifacts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from app.api.deps import (
    JsonBody,
    ReadAccess,
    SessionDep,
    SettingsDep,
    TrainAccess,
    TrainPrincipal,
)
from app.errors import ArtifactMissing, ModelArtifactError, ModelUnavailable
from app.models import ModelVersion
from app.registry import service as registry
from app.registry import versions
from app.registry.store import open_store
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


async def alias_listener(request: Request) -> registry.AliasListener:
    """Who hears that an alias moved: this process's /predict, which loads and warms the new
    target and then serves it from the next request on (other processes hear of it from
    app.notices or their registry poll)."""
    listener: registry.AliasListener = request.app.state.prediction.alias_moved
    return listener


AliasMoved = Annotated[registry.AliasListener, Depends(alias_listener)]


@router.get("", response_model=ModelList, dependencies=[ReadAccess])
def list_models(session: SessionDep) -> ModelList:
    """Every registered name with its latest version and its aliases."""
    models = []
    for name in versions.list_names(session):
        rows = versions.list_versions(session, name)
        aliases = versions.list_aliases(session, name)
        models.append(
            ModelSummary(
                name=name,
                latest_version=_public(rows[-1], aliases),
                versions=len(rows),
                aliases=aliases,
            )
        )
    return ModelList(models=models)


@router.get(
    "/{name}",
    response_model=RegisteredModelPublic,
    dependencies=[ReadAccess],
    responses={404: {"description": "No such registered name (`model_not_found`)."}},
)
def get_model(name: Name, session: SessionDep) -> RegisteredModelPublic:
    rows = registry.existing_versions(session, name)
    aliases = versions.list_aliases(session, name)
    return RegisteredModelPublic(
        name=name,
        latest_version=rows[-1].version,
        aliases=aliases,
        versions=[_public(row, aliases) for row in rows],
    )


@router.put(
    "/{name}/aliases/{alias}",
    response_model=AliasPublic,
    dependencies=[TrainAccess, JsonBody],
    responses={404: {"description": "No such name or version (`model_not_found`)."}},
)
def set_alias(
    name: Name,
    alias: Alias,
    body: AliasUpdate,
    session: SessionDep,
    principal: TrainPrincipal,
    on_moved: AliasMoved,
) -> AliasPublic:
    """Point `name@alias` at a version; moving an alias is one UPDATE, never a gap.

    Only the name's owner (the key that first submitted a job under it) or an admin."""
    row = registry.move_alias(session, principal, name, alias, body.version, on_moved=on_moved)
    return AliasPublic.model_validate(row)


DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "The .keras file."},
    404: {
        "description": "No such version (`model_not_found`), or its file is gone from the "
        "store (`artifact_missing`)."
    },
    503: {
        "description": "The store cannot be reached, or its file does not match the "
        "registered sha256 (`model_unavailable`)."
    },
}


@router.get(
    "/{name}/versions/{version}/artifact",
    response_class=FileResponse,
    dependencies=[ReadAccess],
    responses=DOWNLOAD_RESPONSES,
)
def download_artifact(
    name: Name, version: Version, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    """The version's `.keras` file, streamed from this process's copy of the stored one."""
    row = registry.existing_version(session, name, version)
    what = f"the artifact file of {name} version {version}"
    try:
        path = open_store(settings).fetch_model(row.artifact_path, row.sha256)
    except ArtifactMissing:
        raise ArtifactMissing(f"{what} is missing") from None
    except ModelArtifactError:
        raise ModelUnavailable(f"{what} does not match its registered sha256") from None
    except OSError:
        raise ModelUnavailable(f"{what} cannot be read: the artifact store failed") from None
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{name}-v{version}.keras",
        headers={"ETag": f'"{row.sha256}"', "X-Checksum-Sha256": row.sha256},
    )


@router.get(
    "/{name}/{version}/download",
    response_class=FileResponse,
    dependencies=[ReadAccess],
    responses=DOWNLOAD_RESPONSES,
)
def download(
    name: Name, version: Version, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    """The same file as /models/{name}/versions/{version}/artifact, at the shorter address."""
    return download_artifact(name, version, session, settings)
