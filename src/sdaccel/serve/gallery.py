"""The gallery: the server's recent images as a page at /, each image at /v1/images/{number}."""

from __future__ import annotations

import base64
import html
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response

from sdaccel.serve.server import ServerDep

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def gallery(server: ServerDep):
    return page(server.recent)


@router.get("/v1/images/{number}")
async def image(number: int, server: ServerDep):
    for item in server.recent:
        if item["number"] == number:
            return Response(base64.b64decode(item["png_base64"]), media_type="image/png")
    return JSONResponse({"detail": f"no recent image {number}"}, 404)


def page(recent: list[dict[str, Any]]) -> str:
    cards = "\n".join(
        f'<figure><img src="/v1/images/{item["number"]}" alt="{html.escape(item["prompt"])}">'
        f'<figcaption><b>{html.escape(item["prompt"])}</b><br>seed {item["seed"]}, '
        f'{item["steps"]} steps, {item["width"]}x{item["height"]}, {item["time"]}'
        f'<pre>{html.escape(item["parameters"])}</pre></figcaption></figure>'
        for item in reversed(recent))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sdaccel: recent images</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;width:280px;
vertical-align:top;margin:.5em}} img{{width:256px;image-rendering:pixelated}}
pre{{white-space:pre-wrap;font-size:.75em}}</style></head>
<body><h1>Recent images</h1><p id="count">{len(recent)} image(s)</p>
{cards or '<p>No images yet: POST /sdapi/v1/txt2img or /v1/generate.</p>'}
</body></html>"""
