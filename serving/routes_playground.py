"""The playground's routes: its page (rayft.serving.playground) at / and /playground, open like /healthz (it
holds no data), and under /v1 (behind the keys) the run each served model came from: its eval report and loss
curve."""

import asyncio

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response

from rayft.serving import playground
from rayft.serving.http import errors, viewer
from rayft.serving.openai_api import ApiError
from rayft.training import storage


def playground_routes(api: FastAPI, ing) -> None:
    """The playground of the ingress replica `ing` (its served models and where their weights come from)."""

    @api.get("/", include_in_schema=False)
    @api.get("/playground", include_in_schema=False)
    async def page():
        return HTMLResponse(playground.PAGE, headers=playground.HEADERS)

    async def run_for(model: str, who: str | None) -> str | None:
        source = ing.model_source(await ing._adapter_for(model, who))
        return await asyncio.to_thread(playground.run_of, source)

    say = {404: "No such model for this key, or no rayft run (or no such file in it) behind it."}

    @api.get("/v1/playground/runs", responses=errors(401))
    async def runs(request: Request):
        who, out = viewer(request), []
        for card in (await asyncio.to_thread(ing.models, who))["data"]:
            run = await run_for(card["id"], who)
            if run:
                out.append(await asyncio.to_thread(playground.run_card, card["id"], run))
        return {"object": "list", "data": out}

    async def the_run(model: str, request: Request) -> str:
        run = await run_for(model, viewer(request))
        if run is None:
            raise ApiError(404, f"model {model!r} was not trained by a rayft run this endpoint can read", param="model")
        return run

    @api.get("/v1/playground/runs/report", responses=errors(400, 401, 404, say=say))
    async def run_report(request: Request, model: str = Query(..., description="A served model id.")):
        run = await the_run(model, request)
        report = await asyncio.to_thread(playground.read_report, run)
        if report is None:
            raise ApiError(404, f"run {storage.basename(run)} has no eval report yet: rayft eval writes it")
        return report

    @api.get(
        "/v1/playground/runs/loss.png",
        responses=errors(400, 401, 404, say=say) | {200: {"content": {"image/png": {}}}},
        response_class=Response,
    )
    async def run_loss(request: Request, model: str = Query(..., description="A served model id.")):
        run = await the_run(model, request)
        image = await asyncio.to_thread(playground.read_loss_curve, run)
        if image is None:
            raise ApiError(404, f"run {storage.basename(run)} has no loss.png")
        return Response(image, media_type="image/png")
