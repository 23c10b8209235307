"""Which API a request speaks, from TorchServe's `url_path` header.

TorchServe 0.12's frontend sets `url_path` on every /predictions request to what follows
/predictions/<model>/<version>/ ("" for /predictions/<model> and /predictions/<model>/<version>;
"v1/chat/completions" for /predictions/loraplex/1.0/v1/chat/completions), overwriting a client's
header of that spelling. The KServe routes and gRPC send none. So:

    no url_path or ""           -> our JSON API, unchanged
    v1/chat/completions         -> OpenAI chat   (openai_api.py)
    v1/completions              -> OpenAI completions
    v1/models                   -> OpenAI model list (a GET arrives as an empty body)
    anything else               -> 404 naming the path

A route only reads requests and writes replies and errors; every request, whatever its route,
then goes through the same service checks (`LoraplexService._plan`). A streaming route (later,
with the per-step scheduler) adds a way to write chunks; nothing here assumes one reply per
request beyond `reply`.

Pure, stateless: any thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from . import openai_api
from .errors import UnknownEndpoint, error_body
from .openai_api import Endpoint
from .request import InferenceRequest, parse_request

URL_PATH_HEADER = "url_path"  # the frontend's spelling; another spelling is a client's own header


class Exchange(Protocol):
    """A parsed request and how its reply and errors are written for the API it came by."""

    request: InferenceRequest

    def reply(self, body: Mapping[str, Any]) -> dict: ...

    def error(self, exc: BaseException) -> dict: ...


@dataclass(frozen=True)
class JsonExchange:
    """Our JSON API: the reply body is the service's own."""

    request: InferenceRequest

    def reply(self, body: Mapping[str, Any]) -> dict:
        return dict(body)

    @staticmethod
    def error(exc: BaseException) -> dict:
        return error_body(exc)


@dataclass(frozen=True)
class ModelsExchange:
    """OpenAI's model list: the request names only the caller (tenant, key); the body is the list."""

    request: InferenceRequest

    def reply(self, body: Mapping[str, Any]) -> dict:
        return dict(body)

    @staticmethod
    def error(exc: BaseException) -> dict:
        return openai_api.error_body(exc)


@dataclass(frozen=True)
class Route:
    path: str
    parse: Callable[[Any, Mapping[str, str]], Exchange]
    error: Callable[[BaseException], dict]  # for a request that failed before it was parsed
    lists_models: bool = False  # replies with the model list (no generation) once the checks pass


def _json(body: Any, headers: Mapping[str, str]) -> JsonExchange:
    return JsonExchange(parse_request(body, headers))


def _models(body: Any, headers: Mapping[str, str]) -> ModelsExchange:
    return ModelsExchange(openai_api.models_request(body, headers))


def _openai(endpoint: Endpoint) -> Callable[[Any, Mapping[str, str]], openai_api.OpenAIRequest]:
    return lambda body, headers: openai_api.parse(endpoint, body, headers)


_ROUTES = {
    "": Route("", _json, error_body),
    Endpoint.CHAT.value: Route(Endpoint.CHAT.value, _openai(Endpoint.CHAT), openai_api.error_body),
    Endpoint.COMPLETIONS.value: Route(Endpoint.COMPLETIONS.value, _openai(Endpoint.COMPLETIONS),
                                      openai_api.error_body),
    Endpoint.MODELS.value: Route(Endpoint.MODELS.value, _models, openai_api.error_body,
                                 lists_models=True),
}


def route_for(headers: Mapping[str, str]) -> Route:
    """The route of one request; an unknown path gets a route whose parse raises 404."""
    path = headers.get(URL_PATH_HEADER) if isinstance(headers, Mapping) else None
    if isinstance(path, (bytes, bytearray)):
        path = bytes(path).decode("utf-8", "replace")
    path = (path or "").strip("/")
    route = _ROUTES.get(path)
    if route is not None:
        return route
    shown = path[:80]

    def unknown(body: Any, headers: Mapping[str, str]) -> Exchange:
        raise UnknownEndpoint(f"no endpoint {shown!r} here; this server answers /predictions/<model>[/<version>] "
                              f"and, under /predictions/<model>/<version>/, "
                              f"{', '.join(e.value for e in Endpoint)}")

    return Route(path, unknown, openai_api.error_body if path.startswith("v1/") else error_body)
