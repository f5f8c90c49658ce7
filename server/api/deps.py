"""FastAPI dependencies and their aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security

from server.api.security import api_key_scheme
from server.core.settings import Settings
from server.service import SegmentationService


def get_service(request: Request) -> SegmentationService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


ServiceDep = Annotated[SegmentationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
# Declares the API key in the OpenAPI schema; server/security.py's guard enforces it on every path.
AuthDep = Security(api_key_scheme)
