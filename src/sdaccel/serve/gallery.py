"""The gallery: the server's recent images as a page at /, each image at /v1/images/{number};
and the API key's checks. With a key, the page asks for it once (a form, or `/?key=KEY`) and
keeps a token derived from it in an HttpOnly, SameSite=Strict cookie, which opens the page and
its images (GET only); API clients send the key itself on every request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from sdaccel.serve.checks import read_body
from sdaccel.serve.server import ServerDep

router = APIRouter()
COOKIE = "sdaccel_key"


def cookie_token(api_key: str) -> str:
    """What the cookie holds: derived from the key, so the key itself is never stored."""
    return hmac.new(api_key.encode(), b"sdaccel gallery", hashlib.sha256).hexdigest()


def authorised(request: Request, api_key: str) -> bool:
    """The key as `Authorization: Bearer KEY`, as the password of basic auth, or (reading
    only) the gallery's cookie."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return secrets.compare_digest(value.strip(), api_key)
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except ValueError:
            return False
        return secrets.compare_digest(password, api_key)
    cookie = request.cookies.get(COOKIE, "")
    return request.method in ("GET", "HEAD") and secrets.compare_digest(cookie,
                                                                        cookie_token(api_key))


def login(request: Request, api_key: str) -> Response:
    """/ without the key: `?key=KEY` sets the cookie (and drops the key from the address),
    else the form."""
    given = request.query_params.get("key")
    if given is not None and secrets.compare_digest(given, api_key):
        return _signed_in(api_key)
    return _form(wrong=given is not None)


@router.post("/login")
async def login_form(request: Request, server: ServerDep):
    raw = await read_body(request, 4096)
    given = parse_qs(raw.decode(errors="replace")).get("key", [""])[0]
    if server.api_key and secrets.compare_digest(given, server.api_key):
        return _signed_in(server.api_key)
    return _form(wrong=True)


def _signed_in(api_key: str) -> Response:
    response = RedirectResponse("/", 303)
    response.set_cookie(COOKIE, cookie_token(api_key), httponly=True, samesite="strict",
                        path="/")
    return response


def _form(wrong: bool) -> HTMLResponse:
    note = "<p>Wrong key.</p>" if wrong else ""
    return HTMLResponse(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sdaccel: API key</title></head>
<body><h1>This server needs its API key</h1>{note}
<form method="post" action="/login"><input type="password" name="key" autofocus
placeholder="API key"> <button>Open the gallery</button></form></body></html>""", 401)


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
