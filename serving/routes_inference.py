"""The inference routes: the probes, the models a caller may use, and generation (OpenAI's chat completions and
completions, streamed or not). The work is the Ingress replica's (rayft.serving.ingress): these routes hand each
request to it with who called (rayft.serving.http.viewer)."""

import asyncio

from fastapi import FastAPI, Request

from rayft.serving.http import errors, viewer
from rayft.serving.openai_api import ChatCompletionRequest, CompletionRequest


def model_routes(api: FastAPI, ing) -> None:
    """The probes and /v1/models (what a caller may use) of the ingress replica `ing`."""

    @api.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @api.get("/readyz", responses=errors(503))
    async def readyz():
        return await ing.readyz()

    @api.get("/v1/models", responses=errors(401))
    async def models(request: Request):
        return await asyncio.to_thread(ing.models, viewer(request))

    @api.get("/v1/models/{model_id:path}", responses=errors(401, 404))
    async def model(model_id: str, request: Request):
        await ing._adapter_for(model_id, viewer(request))
        return ing._model_card(model_id)


def generation_routes(api: FastAPI, ing) -> None:
    """Chat completions and completions on the ingress replica `ing`."""
    generation = errors(400, 401, 404, 413, 429, 500, 503, 504)

    @api.post("/v1/chat/completions", responses=generation)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await ing.chat_completions(body, request.state.request_id, viewer(request))

    @api.post("/v1/completions", responses=generation)
    async def completions(body: CompletionRequest, request: Request):
        return await ing.completions(body, request.state.request_id, viewer(request))
