"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: serving new adapters without a restart.

vLLM's paths and bodies (`{"lora_name", "lora_path"}`, `{"lora_name"}`), plus `replace` (vLLM's newer
`load_inplace` is read as the same) to load over a name already served. The routes exist only when
--admin-api-key is set, and every call needs `Authorization: Bearer <admin key>`. A load reads only a
folder inside --adapters-root; the engine reads and validates it off its thread and publishes the name
only once it is whole, so a failed load leaves nothing behind and running streams keep their pace.
Unloading an adapter with requests in flight is refused (409), never done under them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from engine import AsyncEngine
from engine.errors import AdapterError, AdapterExists
from server.dependencies import ServerState, StateDep
from server.errors import AuthenticationFailed

logger = logging.getLogger(__name__)

# What the engine reads from an adapter folder: each must stay inside the root, links included.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# Names clients put in `model`: no path separators, no "..", nothing that needs escaping in a URL.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_PATH_CHARS = 4096
_NOT_INSIDE = "lora_path must name an adapter folder inside the server's adapters root"


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's body; `replace` (or vLLM's `load_inplace`) loads over an adapter of the same name."""

    model_config = ConfigDict(strict=True, extra="ignore")

    lora_name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    lora_path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)
    replace: bool = False
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's body; `lora_int_id` is accepted and ignored (names are the only ids here)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None


def confine(root: Path, lora_path: str) -> Path:
    """The adapter folder that `lora_path` names, resolved, provided it lies inside `root`.

    Relative paths are taken from the root; absolute ones must point inside it. Refused with an
    AdapterError (a message that never repeats the path): `..` parts, NUL bytes, folders that do not
    exist, and symbolic links, of the folder or of the files the engine reads, that lead out of the root.
    The root is trusted: whoever can write in it can already serve any adapter.
    """
    given = Path(lora_path)
    if "\x00" in lora_path or ".." in given.parts:
        raise AdapterError("lora_path must not contain '..' or NUL characters", param="lora_path")
    try:
        real_root = root.resolve(strict=True)
    except (OSError, RuntimeError):
        raise AdapterError("the server's adapters root is not available", param="lora_path") from None
    try:
        folder = (given if given.is_absolute() else real_root / given).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a link loop, unreadable
        raise AdapterError(_NOT_INSIDE, param="lora_path") from None
    if not folder.is_relative_to(real_root):
        raise AdapterError(_NOT_INSIDE, param="lora_path")
    if not folder.is_dir():
        raise AdapterError("lora_path must name a folder, not a file", param="lora_path")
    for name in ADAPTER_FILES:
        file = folder / name
        if file.is_symlink() and not file.resolve().is_relative_to(real_root):
            raise AdapterError(f"{name} links outside the adapters root", param="lora_path")
    return folder


class AdapterAdmin:
    """Loads and unloads adapters for the admin routes, one operation at a time (so that two loads of
    one name cannot both pass the "already loaded" check, and reads never pile up in memory)."""

    def __init__(self, engine: AsyncEngine, base_name: str, root: Path) -> None:
        self._engine = engine
        self._base_name = base_name
        self._root = root
        self._lock = asyncio.Lock()

    async def load(self, name: str, lora_path: str, *, replace: bool) -> None:
        """Serve the adapter at `lora_path` as `name`. Raises AdapterError (400), AdapterExists or
        AdapterInUse (409); the engine checks the config, target modules, shapes and rank."""
        if name == self._base_name:
            raise AdapterExists(f"{name!r} is the base model's name; choose another", param="lora_name")
        folder = confine(self._root, lora_path)
        async with self._lock:
            started = time.perf_counter()
            try:
                await self._engine.add_adapter(name, folder, replace=replace)
            except AdapterError as e:
                if type(e) is AdapterError:  # what the engine found wrong in the folder's files
                    e.param = "lora_path"
                raise
        logger.info("adapter %s loaded in %.2f s", name, time.perf_counter() - started)

    async def unload(self, name: str) -> None:
        """Stop serving `name`. Raises UnknownAdapter (404) or AdapterInUse (409)."""
        async with self._lock:
            await self._engine.remove_adapter(name)
        logger.info("adapter %s unloaded", name)


async def get_admin(request: Request) -> AdapterAdmin:
    admin = request.app.state.adapter_admin
    assert isinstance(admin, AdapterAdmin)
    return admin


async def require_admin_key(request: Request, state: StateDep) -> None:
    """`Authorization: Bearer <admin key>`, compared in constant time. The ordinary --api-key does not
    open these routes."""
    key = state.settings.admin_api_key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = key.get_secret_value().encode("utf-8") if key is not None else b""
    given = token.strip().encode("utf-8", errors="replace")
    if not expected or scheme.lower() != "bearer" or not secrets.compare_digest(given, expected):
        raise AuthenticationFailed("Missing or incorrect admin key: send 'Authorization: Bearer <key>'.")


AdminDep = Annotated[AdapterAdmin, Depends(get_admin)]
router = APIRouter(dependencies=[Depends(require_admin_key)])


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, admin: AdminDep) -> str:
    await admin.load(body.lora_name, body.lora_path, replace=body.replace or body.load_inplace)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, admin: AdminDep) -> str:
    await admin.unload(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


def install_adapter_admin(app: FastAPI, state: ServerState) -> None:
    """Mount the admin routes when --admin-api-key is set (Settings makes --adapters-root required
    then); without it they do not exist and answer 404 like any unknown path."""
    settings = state.settings
    if settings.admin_api_key is None or settings.adapters_root is None:
        return
    app.state.adapter_admin = AdapterAdmin(state.engine, state.registry.base_name, settings.adapters_root)
    app.include_router(router)
    logger.info("adapter admin routes on: adapters may be loaded from %s", settings.adapters_root)
