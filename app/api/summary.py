"""GET /summary/{net}: shapes and parameter counts layer by layer, checked against Keras."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fastapi import APIRouter

from app.errors import UnknownNet
from app.ml.nets import NETS
from app.schemas import SummaryPublic

router = APIRouter(tags=["nets"])


@lru_cache(maxsize=len(NETS) or None)
def _summary(net: str) -> dict[str, Any]:
    # Builds the Keras model (and imports TensorFlow) the first time; nets never change.
    from app.ml.summary import summarize

    return summarize(net).to_dict()


@router.get(
    "/summary/{net}",
    response_model=SummaryPublic,
    responses={404: {"description": "Unknown net; the message lists the known ones."}},
)
def net_summary(net: str) -> dict[str, Any]:
    if net not in NETS:
        raise UnknownNet(
            f"unknown net; known nets: {', '.join(NETS)}", details={"known": list(NETS)}
        )
    return _summary(net)
