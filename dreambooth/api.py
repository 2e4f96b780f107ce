"""HTTP API under ``/dreambooth/``: models, configs, training jobs, samples and export, as JSON.

Mounted on the WebUI's FastAPI app (``add_routes(app, host)``) or any other app (``create_router(host)``). Works
with the WebUI's fastapi 0.94 / pydantic 1.10 and with current fastapi / pydantic 2: bodies are read as plain JSON
objects and checked here, so no pydantic model is involved.

Every error is JSON ``{"error": message, "hint": hint}``: 400 bad input, 401 missing or wrong credentials,
404 unknown model or sample, 409 a model that is training (or not training, for pause/resume/cancel) or already
exists, 500 anything unexpected (logged with its traceback).

``host`` is any object with ``models_root()``, ``checkpoint_dir()``, ``checkpoints()`` (paths, or a mapping of
title to path), ``attention_default()`` and ``after_export(path)``; optional: ``auth`` (None, ``{user: password}``
or a function ``(user, password) -> bool``; else ``api_credentials()`` is asked for the dict), ``device()`` (the
torch device for training) and ``training_started(model, is_running=..., read_status=..., job=...)`` (``job``:
"sampling" for ``.../sample``). When credentials are set, every route needs them (HTTP basic, as the WebUI's
``--api-auth user:pass,user2:pass2``).

Source checkpoints for a new model must be one the host lists or lie inside its checkpoint folder (symlinks
resolved), so the API never reads other files of the machine.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import jobs
from .checkpoint_file import read_metadata
from .config import (
    CONFIG_VERSION,
    EMA_EXPORTS,
    FILE_DTYPES,
    METHODS,
    Concept,
    TrainConfig,
    config_from_dict,
    field_specs,
    load_config,
)
from .errors import StoreError, UserError
from .families import FAMILY_IDS
from .store import ModelDir, list_models, model_dir

log = logging.getLogger(__name__)

PREFIX = "/dreambooth"
REALM = "dreambooth"
# set when a model is created or by training: kept from the stored config whatever a PUT sends
MANAGED_FIELDS = ("model_name", "family", "source_checkpoint", "source_sha256", "revision", "epochs_trained")
MAX_BODY_BYTES = 1024 * 1024  # a JSON body of settings; more is a mistake or an attack on the host's memory

Authenticator = Callable[[str, str], bool]


class ApiError(Exception):
    """An error answered as JSON with a status code."""

    def __init__(self, status: int, message: str, hint: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "hint": self.hint}, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------------------------------
# auth


def make_authenticator(auth: object) -> Authenticator | None:
    """None (no auth), ``{user: password}``, or a function ``(user, password) -> bool``."""
    if auth is None:
        return None
    if isinstance(auth, Mapping):
        credentials = [(str(u).encode("utf-8"), str(p).encode("utf-8")) for u, p in auth.items()]

        def check(user: str, password: str) -> bool:
            u, p = user.encode("utf-8"), password.encode("utf-8")
            ok = False
            for known_user, known_password in credentials:  # no early exit: the time does not tell which matched
                ok |= secrets.compare_digest(u, known_user) & secrets.compare_digest(p, known_password)
            return ok

        return check
    if callable(auth):
        return lambda user, password: bool(auth(user, password))
    raise TypeError(f"auth must be None, a dict of user -> password or a function, not {type(auth).__name__}")


def _host_auth(host: object) -> Authenticator | None:
    auth = getattr(host, "auth", None)
    if auth is None:
        credentials = getattr(host, "api_credentials", None)
        auth = credentials() if callable(credentials) else None
    return make_authenticator(auth)


def basic_credentials(request: Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def _check_auth(request: Request, authenticate: Authenticator | None) -> None:
    if authenticate is None:
        return
    given = basic_credentials(request)
    if given is None or not authenticate(*given):
        raise ApiError(401, "authentication required" if given is None else "wrong user name or password",
                       "send HTTP basic credentials (one of the WebUI's --api-auth pairs)",
                       {"WWW-Authenticate": f'Basic realm="{REALM}"'})


def _route_class(authenticate: Authenticator | None) -> type[APIRoute]:
    """Routes that check auth before anything else and turn every error into ``{"error", "hint"}`` JSON."""

    class DreamboothRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    _check_auth(request, authenticate)
                    return await handler(request)
                except ApiError as err:
                    return err.response()
                except jobs.AlreadyRunning as err:
                    return ApiError(409, err.message, err.hint).response()
                except jobs.NotRunning as err:
                    return ApiError(409, err.message, err.hint).response()
                except UserError as err:
                    return ApiError(400, err.message, err.hint).response()
                except RequestValidationError as err:
                    return ApiError(400, f"bad request: {err}", "check the URL and body").response()
                except HTTPException as err:
                    return ApiError(err.status_code, str(err.detail)).response()
                except Exception as err:  # noqa: BLE001 - answered as JSON, logged with the traceback
                    log.exception("dreambooth API: %s %s failed", request.method, request.url.path)
                    return ApiError(500, f"unexpected {type(err).__name__}: {err}",
                                    "see the server log for the traceback; report it if it looks like a bug"
                                    ).response()

            return guarded

    return DreamboothRoute


# ---------------------------------------------------------------------------------------------------------------
# inputs


async def _json_object(request: Request, allowed: Iterable[str], *, required: bool = True) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refused before it is read
        raise _too_large(int(declared))
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise _too_large(len(body))
    if not body.strip():
        if required:
            raise ApiError(400, "the request needs a JSON object body", "send Content-Type: application/json")
        return {}
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", "send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}",
                       "send a JSON object like {\"key\": value}")
    allowed = list(allowed)
    if allowed:
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}", f"known fields: {', '.join(allowed)}")
    return data


def _too_large(size: int) -> ApiError:
    return ApiError(413, f"the request body is {size:,} bytes; the limit is {MAX_BODY_BYTES:,}",
                    "send only the settings (a config is a few KB); images and checkpoints go into their folders")


def _field(data: dict[str, Any], key: str, kind: type, default: Any = None, *, required: bool = False,
           choices: Iterable[Any] | None = None) -> Any:
    if key not in data or data[key] is None:
        if required:
            raise ApiError(400, f"{key}: required", f"add \"{key}\" to the JSON body")
        return default
    value = data[key]
    if not isinstance(value, kind) or kind is not bool and isinstance(value, bool):
        raise ApiError(400, f"{key}: expected {kind.__name__}, got {value!r}", "fix the JSON body")
    if choices is not None and value not in choices:
        raise ApiError(400, f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}",
                       "pick one of the listed values")
    return value


def _open(host: Any, name: str) -> ModelDir:
    """The model dir ``name``: 400 for a name that is not one safe folder name, 404 when there is no such model."""
    try:
        md = model_dir(name, host.models_root())
    except StoreError as err:
        raise ApiError(400, err.message, err.hint) from None
    if not md.exists():
        known = list_models(host.models_root())
        raise ApiError(404, f"no model named {name!r}",
                       f"known models: {', '.join(known)}" if known else "create one with POST /dreambooth/models")
    return md


def _known_checkpoints(host: Any) -> dict[str, Path]:
    """title -> path of the checkpoints the host lists (a bare path's title is its file name)."""
    listed = host.checkpoints() or []
    if isinstance(listed, Mapping):
        return {str(title): Path(path) for title, path in listed.items()}
    out: dict[str, Path] = {}
    for entry in listed:
        if isinstance(entry, tuple) and len(entry) == 2:
            out[str(entry[0])] = Path(entry[1])
        else:
            out.setdefault(Path(entry).name, Path(entry))
    return out


def resolve_source(host: Any, source: str) -> Path:
    """The checkpoint file or diffusers folder ``source`` names, if the host allows it: a title or path from
    ``host.checkpoints()``, or a path (absolute, or relative to the checkpoint folder) inside ``checkpoint_dir()``.
    Symlinks are resolved first, so a link that leads out of the folder is refused."""
    known = _known_checkpoints(host)
    if source in known:
        candidate = known[source]
    else:
        candidate = Path(source).expanduser()
        if not candidate.is_absolute():
            candidate = Path(host.checkpoint_dir()) / candidate
    try:
        resolved = candidate.resolve()
        root = Path(host.checkpoint_dir()).resolve()
        allowed = {Path(p).resolve() for p in known.values()}
    except (OSError, RuntimeError) as err:
        raise ApiError(400, f"source {source!r} cannot be resolved: {err}", "pick a listed checkpoint") from None
    hint = "pick one from GET /dreambooth/checkpoints, or put the file into the checkpoint folder"
    if resolved not in allowed and (resolved == root or not resolved.is_relative_to(root)):
        raise ApiError(400, f"source {source!r} is not one of the host's checkpoints", hint)
    if not resolved.exists():
        raise ApiError(400, f"source checkpoint {source!r} does not exist", hint)
    return resolved


def _sample_path(md: ModelDir, file: str) -> Path:
    """``samples/<file>`` if ``file`` is a plain ``.png`` file name directly in ``samples/`` (no links)."""
    bad = (not file or file != Path(file).name or any(c in file for c in "/\\\x00") or file.startswith(".")
           or ".." in file or not file.lower().endswith(".png"))
    if bad:
        raise ApiError(400, f"{file!r} is not a sample file name", "use a name from GET .../samples")
    folder = md.samples
    path = folder / file
    if folder.is_symlink() or path.is_symlink() or not path.is_file() or path.resolve().parent != folder.resolve():
        raise ApiError(404, f"no sample {file!r} for model {md.name!r}", "use a name from GET .../samples")
    return path


# ---------------------------------------------------------------------------------------------------------------
# outputs


def _summary(md: ModelDir) -> dict[str, Any]:
    out: dict[str, Any] = {"name": md.name}
    try:
        cfg = load_config(md.path)
    except UserError as err:
        out["error"] = str(err)
    else:
        out.update(family=cfg.family, revision=cfg.revision, epochs_trained=cfg.epochs_trained,
                   source_checkpoint=cfg.source_checkpoint, concepts=len(cfg.concepts))
    current = jobs.status(md)
    out.update(state=current.get("state"), running=current["running"])
    return out


def _png_info(path: Path) -> dict[str, Any]:
    """Prompt, seed and step of a preview, from its ``dreambooth`` (JSON) or ``parameters`` (infotext) chunk."""
    from PIL import Image

    info: dict[str, Any] = {"prompt": None}
    try:
        with Image.open(path) as image:
            chunks = dict(image.info)
            info["width"], info["height"] = image.size
    except Exception:  # noqa: BLE001 - a broken file is listed without its details
        return info
    try:
        data = json.loads(chunks.get("dreambooth", ""))
        request, extra = data.get("request", {}), data.get("extra", {})
        info.update(prompt=request.get("prompt"), negative_prompt=request.get("negative_prompt"),
                    seed=request.get("seed"), steps=request.get("steps"), step=_int(extra.get("step")),
                    epoch=_int(extra.get("epoch")))
    except (ValueError, AttributeError, TypeError):
        parameters = chunks.get("parameters")
        if isinstance(parameters, str) and parameters:
            info["prompt"] = parameters.splitlines()[0]
    return info


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def list_samples(md: ModelDir) -> list[dict[str, Any]]:
    folder = md.samples
    if folder.is_symlink() or not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() != ".png" or path.is_symlink() or not path.is_file():
            continue
        stat = path.stat()
        out.append({"file": path.name, "url": f"{PREFIX}/models/{quote(md.name)}/samples/{quote(path.name)}",
                    "bytes": stat.st_size, "modified": stat.st_mtime, **_png_info(path)})
    return out


def _spec_json(spec: Any) -> dict[str, Any]:
    default = spec.default if spec.default is not dataclasses.MISSING else None
    return {"name": spec.name, "type": getattr(spec.type, "__name__", str(spec.type)), "default": default,
            "label": spec.label, "help": spec.help, "group": spec.group, "min": spec.minimum, "max": spec.maximum,
            "choices": list(spec.choices) if spec.choices is not None else None, "ui": spec.ui,
            "methods": list(spec.methods) if spec.methods is not None else None,
            "optimizers": list(spec.optimizers) if spec.optimizers is not None else None,
            "predictions": list(spec.predictions) if spec.predictions is not None else None,
            "requires": {spec.requires[0]: list(spec.requires[1])} if spec.requires else None}


def schema() -> dict[str, Any]:
    """Every setting; ``method_defaults``: its default per training method, where the methods' defaults differ
    (``default`` is the default method's; choosing a method gives the settings not changed its defaults)."""
    from .train.methods import method_defaults

    by_method = {m: method_defaults(m) for m in METHODS}
    config = []
    for spec in field_specs(TrainConfig):
        values = {m: defaults[spec.name] for m, defaults in by_method.items()}
        config.append({**_spec_json(spec), "method_defaults": values if len(set(values.values())) > 1 else None})
    return {"version": CONFIG_VERSION, "config": config, "concept": [_spec_json(s) for s in field_specs(Concept)]}


def _is_export_of(path: Path, name: str) -> bool:
    try:
        metadata = read_metadata(path)
    except Exception:  # noqa: BLE001 - not a file we wrote
        return False
    return "dreambooth.version" in metadata and metadata.get("modelspec.title") == name


def _device(host: Any) -> str | None:
    device = getattr(host, "device", None)
    return device() if callable(device) else device


# ---------------------------------------------------------------------------------------------------------------
# routes


def create_router(host: Any) -> APIRouter:
    """The ``/dreambooth/...`` routes for ``host`` (see the module doc for what ``host`` provides)."""
    router = APIRouter(prefix=PREFIX, tags=["dreambooth"], route_class=_route_class(_host_auth(host)))

    @router.get("/schema")
    async def get_schema() -> Response:
        return JSONResponse(schema())

    @router.get("/checkpoints")
    async def get_checkpoints() -> Response:
        items = await run_in_threadpool(_known_checkpoints, host)
        return JSONResponse({"checkpoint_dir": str(host.checkpoint_dir()),
                             "checkpoints": [{"title": t, "path": str(p)} for t, p in items.items()]})

    @router.get("/models")
    async def get_models() -> Response:
        def summaries() -> list[dict[str, Any]]:
            root = host.models_root()
            return [_summary(model_dir(name, root)) for name in list_models(root)]

        return JSONResponse({"models": await run_in_threadpool(summaries)})

    @router.post("/models")
    async def create(request: Request) -> Response:
        from .create import create_model

        data = await _json_object(request, ("name", "source", "family", "extract_ema"))
        name = _field(data, "name", str, required=True)
        source = _field(data, "source", str, required=True)
        family = _field(data, "family", str, choices=FAMILY_IDS)
        extract_ema = _field(data, "extract_ema", bool, False)
        try:
            target = model_dir(name, host.models_root())
        except StoreError as err:
            raise ApiError(400, err.message, err.hint) from None
        if target.path.exists():
            raise ApiError(409, f"a model named {name!r} already exists", "pick another name")
        path = resolve_source(host, source)
        md = await run_in_threadpool(create_model, path, name, host.models_root(), family=family,
                                     extract_ema=extract_ema)
        log.info("API: created model %s from %s", md.name, path)
        return JSONResponse(await run_in_threadpool(_summary, md), status_code=201)

    @router.get("/models/{name}")
    async def get_model(name: str) -> Response:
        md = _open(host, name)

        def details() -> dict[str, Any]:
            out = _summary(md)
            out["config"] = load_config(md.path).to_dict() if "error" not in out else None
            out["status"] = jobs.status(md)
            out["samples"] = len(list_samples(md))
            return out

        return JSONResponse(await run_in_threadpool(details))

    @router.get("/models/{name}/config")
    async def get_config(name: str) -> Response:
        md = _open(host, name)
        return JSONResponse(load_config(md.path).to_dict())

    @router.put("/models/{name}/config")
    async def put_config(name: str, request: Request) -> Response:
        md = _open(host, name)
        data = await _json_object(request, ())
        if jobs.running(md):
            raise ApiError(409, f"{name!r} is training; its config cannot change now",
                           "wait for the training to end, or cancel it")
        cfg, notes = config_from_dict(data)
        stored = load_config(md.path)
        for key in MANAGED_FIELDS:
            kept = getattr(stored, key)
            if key in data and getattr(cfg, key) != kept:
                notes.append(f"{key}: kept {kept!r}; it is set by create and training, not by the config")
            setattr(cfg, key, kept)
        await run_in_threadpool(cfg.save, md.path)
        return JSONResponse({"config": cfg.to_dict(), "notes": notes})

    @router.post("/models/{name}/import-kohya")
    async def import_kohya_dataset(name: str, request: Request) -> Response:
        """{"toml": FILE} or {"folder": DIR, "reg_folder": DIR}: the model's concepts from a kohya dataset."""
        from .data.kohya import import_kohya

        md = _open(host, name)
        data = await _json_object(request, ("toml", "folder", "reg_folder"))
        toml, folder = _field(data, "toml", str), _field(data, "folder", str)
        if bool(toml) == bool(folder):
            raise ApiError(400, "give either \"toml\" (a dataset .toml) or \"folder\" (<repeats>_<name> folders)",
                           "send one of the two keys")
        reg = _field(data, "reg_folder", str)
        if reg and not folder:
            raise ApiError(400, "reg_folder goes with folder", "put the reg subsets (is_reg = true) into the TOML")
        if jobs.running(md):
            raise ApiError(409, f"{name!r} is training; its concepts cannot change now",
                           "wait for the training to end, or cancel it")
        result = await run_in_threadpool(import_kohya, md, toml or folder, reg)
        return JSONResponse({**result.to_dict(), "message": result.summary(),
                             "config": load_config(md.path).to_dict()})

    @router.post("/models/{name}/train")
    async def train(name: str, request: Request) -> Response:
        md = _open(host, name)
        data = await _json_object(request, ("resume",), required=False)
        resume = _field(data, "resume", bool, False)
        pid = await run_in_threadpool(lambda: jobs.start(
            md, models_root=host.models_root(), resume=resume, device=_device(host),
            export_dir=Path(host.checkpoint_dir()), attention_default=host.attention_default(),
            lora_dir=Path(host.lora_dir()) if hasattr(host, "lora_dir") else None,
            embeddings_dir=Path(host.embeddings_dir()) if hasattr(host, "embeddings_dir") else None,
            hypernetworks_dir=Path(host.hypernetworks_dir()) if hasattr(host, "hypernetworks_dir") else None))
        started = getattr(host, "training_started", None)
        if callable(started):  # e.g. the WebUI frees VRAM and mirrors progress; may block for a moment
            await run_in_threadpool(lambda: started(md, is_running=lambda: jobs.running(md),
                                                    read_status=lambda: jobs.status(md)))
        log.info("API: started training of %s (pid %d)", md.name, pid)
        return JSONResponse({"pid": pid, "status": await run_in_threadpool(jobs.status, md)}, status_code=202)

    @router.post("/models/{name}/sample")
    async def sample(name: str) -> Response:
        """Previews of what the model has trained (its last save) now, with the saved config, made by a worker
        ("Generate samples now"); 202 at once, the result in .../status (``samples``) and .../samples."""
        from .sample_job import check_previews

        md = _open(host, name)
        await run_in_threadpool(lambda: check_previews(load_config(md.path)))
        pid = await run_in_threadpool(lambda: jobs.start(md, models_root=host.models_root(), device=_device(host),
                                                         attention_default=host.attention_default(), job="sample"))
        started = getattr(host, "training_started", None)
        if callable(started):  # the WebUI's model leaves VRAM while the worker samples
            await run_in_threadpool(lambda: started(md, is_running=lambda: jobs.running(md),
                                                    read_status=lambda: jobs.status(md), job="sampling"))
        return JSONResponse({"pid": pid, "status": await run_in_threadpool(jobs.status, md)}, status_code=202)

    def control(action: Callable[[ModelDir], None]) -> Callable[[str], Awaitable[Response]]:
        async def endpoint(name: str) -> Response:
            md = _open(host, name)
            await run_in_threadpool(action, md)
            return JSONResponse(await run_in_threadpool(jobs.status, md))

        return endpoint

    router.add_api_route("/models/{name}/pause", control(jobs.pause), methods=["POST"], name="pause")
    router.add_api_route("/models/{name}/resume", control(jobs.unpause), methods=["POST"], name="resume")
    router.add_api_route("/models/{name}/cancel", control(jobs.cancel), methods=["POST"], name="cancel")

    @router.get("/models/{name}/status")
    async def get_status(name: str) -> Response:
        return JSONResponse(await run_in_threadpool(jobs.status, _open(host, name)))

    @router.get("/models/{name}/samples")
    async def get_samples(name: str) -> Response:
        md = _open(host, name)
        return JSONResponse({"samples": await run_in_threadpool(list_samples, md)})

    @router.get("/models/{name}/samples/{file}")
    async def get_sample(name: str, file: str) -> Response:
        return FileResponse(_sample_path(_open(host, name), file), media_type="image/png")

    @router.post("/models/{name}/export")
    async def export(name: str, request: Request) -> Response:
        from .export import export_checkpoint

        md = _open(host, name)
        data = await _json_object(request, ("dtype", "ema", "overwrite"), required=False)
        cfg = load_config(md.path)
        dtype = _field(data, "dtype", str, cfg.export_dtype, choices=FILE_DTYPES)
        ema = _field(data, "ema", str, "none", choices=EMA_EXPORTS)
        overwrite = _field(data, "overwrite", bool, False)
        if jobs.running(md):
            raise ApiError(409, f"{name!r} is training; export when it has ended",
                           "the run exports at each save when 'Export a checkpoint at each save' is on")
        dest = Path(host.checkpoint_dir()) / f"{md.name}.safetensors"
        if dest.exists() and not overwrite and not await run_in_threadpool(_is_export_of, dest, md.name):
            raise ApiError(409, f"{dest} exists and was not exported from {name!r}",
                           "send \"overwrite\": true to replace it, or rename the file")
        path = await run_in_threadpool(lambda: export_checkpoint(md, dest, dtype=dtype, ema=ema))
        await run_in_threadpool(host.after_export, path)
        log.info("API: exported %s to %s", md.name, path)
        return JSONResponse({"path": str(path)})

    return router


def add_routes(app: FastAPI, host: Any) -> None:
    """Mount the ``/dreambooth/...`` routes on ``app`` (the WebUI's ``on_app_started`` gives it)."""
    app.include_router(create_router(host))
