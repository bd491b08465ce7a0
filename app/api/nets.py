"""GET /nets: the architectures a job can train."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ReadAccess
from app.ml.nets import NETS
from app.schemas import NetList, NetPublic

router = APIRouter(tags=["nets"])


@router.get("/nets", response_model=NetList, dependencies=[ReadAccess])
def list_nets() -> NetList:
    return NetList(
        nets=[
            NetPublic(**spec.to_dict(), summary_url=f"/summary/{spec.name}")
            for spec in NETS.values()
        ]
    )
