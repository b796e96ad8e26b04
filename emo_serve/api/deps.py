"""Dependencies of the routes: the service and settings on `app.state`, and bearer-key auth.

All are `async def`: FastAPI runs plain `def` dependencies on a thread pool, a thread hand-off
per dependency per request. Keys are compared in constant time (`hmac.compare_digest`).
`/v1/*` needs the API key when one is configured; creating, deleting, loading and unloading
subsets needs the admin key (which defaults to the API key). Reading routes accept either key.
The key may also come as HTTP Basic credentials (any user name, the key as password): that is
how a browser sends it to `/ui` and, once asked, to the images and JSON the page loads.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from ..settings import Settings
from .errors import APIError
from .service import EmoService
from .serving import OpenAIServing

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def get_service(request: Request) -> EmoService:
    return request.app.state.service


async def get_settings(request: Request) -> Settings:
    return request.app.state.service.settings


async def get_serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


Service = Annotated[EmoService, Depends(get_service)]
Serving = Annotated[OpenAIServing, Depends(get_serving)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _token(request: Request, bearer: HTTPAuthorizationCredentials | None) -> str:
    """The key a request carries: a bearer token, or the password of Basic credentials."""
    if bearer is not None:
        return bearer.credentials
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
    except (binascii.Error, UnicodeDecodeError):
        return ""


def _matches(token_text: str, *keys: SecretStr | None) -> bool:
    token = token_text.encode()
    ok = False
    for key in keys:
        if key is not None:  # check every key, so timing does not tell which one matched
            ok |= hmac.compare_digest(token, key.get_secret_value().encode())
    return ok


def _unauthorized(what: str) -> APIError:
    return APIError(401, f"invalid or missing {what}: send `Authorization: Bearer <key>`",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request, settings: SettingsDep, credentials: Credentials) -> None:
    """Any `/v1/*` route: the API key (or the admin key) when an API key is configured."""
    if settings.api_key is not None and not _matches(_token(request, credentials), settings.api_key,
                                                     settings.admin_key):
        raise _unauthorized("API key")


async def require_admin_key(request: Request, settings: SettingsDep, credentials: Credentials) -> None:
    """Routes that change subsets or start/stop engines."""
    admin = settings.effective_admin_key
    if admin is not None and not _matches(_token(request, credentials), admin):
        raise _unauthorized("admin key")


async def require_page_key(request: Request, settings: SettingsDep, credentials: Credentials) -> None:
    """The page: the API key as for `/v1/*`, asked for with a Basic challenge so a browser prompts."""
    if settings.api_key is not None and not _matches(_token(request, credentials), settings.api_key,
                                                     settings.admin_key):
        raise APIError(401, "invalid or missing API key: sign in with any user name and the API key as "
                       "password, or send `Authorization: Bearer <key>`", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Basic realm="emo-serve", charset="UTF-8"'})


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)
PageKey = Depends(require_page_key)
