"""FastAPI dependencies and their aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from server.service import SegmentationService
from server.settings import Settings


def get_service(request: Request) -> SegmentationService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def require_api_key(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    if not x_api_key:
        raise HTTPException(401, "missing API key: send it in the X-API-Key header", headers={"WWW-Authenticate": "ApiKey"})
    if not any(hmac.compare_digest(x_api_key, k) for k in keys):
        raise HTTPException(403, "API key not accepted")


ServiceDep = Annotated[SegmentationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
AuthDep = Depends(require_api_key)
