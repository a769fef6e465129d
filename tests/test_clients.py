"""The clients people put in front of an AUTOMATIC1111 server, as their own source builds their
requests: SillyTavern, Open WebUI, webuiapi, LibreChat, aiyabot and openOutpaint.

tests/fixtures/clients/<client>/NN_*.json are the requests each one sends, recorded from its
published source (the fixture's `source` names repository, commit, file and line; the
folder's README says how to read them). A client's flow replays its fixtures in order against
the app over a fake engine (test_serve.py's FakeEngine, taught image starts, the hires fix and
step callbacks), with a models folder of two checkpoints, a LoRA and an embedding, and checks
what the client reads from each answer: shapes and types, `info` as a JSON string with seed,
width, height and infotexts, images that decode as PNG at the size asked. Every problem of a
flow is reported at once, each naming the client, the request and what was missing.

The last test drives a live `sdaccel serve` (the bundled model) with the `webuiapi` package.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import tiny_settings
from PIL import Image
from safetensors.torch import save_file
from test_serve import FAKE_SETTINGS, FakeEngine

import sdaccel
from sdaccel.serve.app import Limits, create_app
from sdaccel.serve.models_dir import ModelsDir

FIXTURES = Path(__file__).parent / "fixtures" / "clients"
CLIENTS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
PLACEHOLDER = re.compile(r"<(pick:[^<>]+|other-model|(?:data:)?(?:png|mask):\d+x\d+)>")
SOURCE = re.compile(r"[\w.-]+/[\w.-]+@(?:[0-9a-f]{40}|main):[\w./-]+:\S+")


# --------------------------------------------------------------------------- the fake engine


class ClientsEngine(FakeEngine):
    """FakeEngine with the rest of Engine.generate's contract: `start` (image to image,
    inpainting), `hires` (the result is the upscaled size), `on_step` (a StepState a step) and
    `decode` (the progress preview). Named after the checkpoint file it was started on."""

    def __init__(self, settings, on_event, calls: list[dict]):
        super().__init__(settings, on_event)
        model = Path(settings.model_id)
        if model.is_file():
            digest = hashlib.sha256(model.read_bytes()).hexdigest()
            self.components = SimpleNamespace(name=model.name, model_hash=digest[:10])
        self.calls = calls  # shared by every engine of the app, in call order
        self.step_seconds = 0.0  # how long each step takes

    def generate(self, prompts, negative_prompt="", seed=None, generation=None, sampler=None,
                 loras=None, on_step=None, start=None, hires=None):
        from sdaccel.engine.engine import ImageResult
        from sdaccel.events import StepDone

        generation = generation or self.settings.generation
        sampler = sampler or self.settings.sampler
        seeds = [seed + k for k in range(len(prompts))] if isinstance(seed, int) else list(seed)
        self.calls.append({"engine": self, "prompts": list(prompts), "seeds": seeds,
                           "generation": generation, "sampler": sampler,
                           "loras": list(loras or []), "start": start, "hires": hires})
        self.running.set()
        for step in range(1, sampler.steps + 1):
            self.on_event(StepDone(step, sampler.steps, len(prompts)))
            if on_step is not None:
                on_step(self.step_state(step, sampler.steps, generation, len(prompts)))
            if self.hold is not None:
                self.hold.wait(5)
            time.sleep(self.step_seconds)
        width, height = generation.width, generation.height
        if hires is not None and hires.enabled:
            width, height = round(width * hires.scale), round(height * hires.scale)
        masked = start is not None and start.masks is not None
        return [ImageResult(
            prompt=p, negative_prompt=negative_prompt, seed=k, steps=sampler.steps,
            nfe=2 * sampler.steps, cost=float(sampler.steps), decisions="F" * sampler.steps,
            image=Image.new("RGB", (width, height), (k % 256, 0, 0)), latents=None, seconds=0.0,
            generation=generation, strength=None if start is None else generation.strength,
            mask_blur=start.mask_blur if masked else None,
            hires=hires if hires is not None and hires.enabled else None)
            for p, k in zip(prompts, seeds, strict=True)]

    @staticmethod
    def step_state(step: int, total: int, generation, rows: int):
        from sdaccel.engine.sampling.loop import StepState

        latents = torch.zeros(rows, 4, generation.height // 8, generation.width // 8)
        return StepState(step=step, total_steps=total, timestep=torch.tensor(999 - step),
                         positions=torch.arange(rows), latents=latents, decisions="F" * rows,
                         costs=(float(step),) * rows)

    def decode(self, latents):
        rows, _, height, width = latents.shape
        return [Image.new("RGB", (width * 8, height * 8), (0, 128, 0)) for _ in range(rows)]


def models_folder(root: Path) -> Path:
    """A1111's layout: two checkpoints (never loaded: the engine is fake), a LoRA whose alias is
    its output name, an SD1 embedding."""
    for name, fill in (("alpha", 0.0), ("beta", 1.0)):
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.full((2,), fill)}, root / "checkpoints" / f"{name}.safetensors")
    (root / "loras").mkdir()
    save_file({"x": torch.zeros(2)}, root / "loras" / "ring.safetensors",
              metadata={"ss_output_name": "ring"})
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.zeros(2, 768)}, root / "embeddings" / "shiny.safetensors")
    return root


@contextmanager
def clients_app(tmp_path: Path, limits: Limits | None = None):
    """A TestClient on the app over ClientsEngines, serving checkpoints/alpha of a models
    folder; yields (client, the engine calls, whether create_app took the folder)."""
    models = models_folder(tmp_path / "models")
    calls: list[dict] = []
    alpha = models / "checkpoints" / "alpha.safetensors"
    settings = tiny_settings(*FAKE_SETTINGS, f"model_id={alpha}", f"io.out_dir={tmp_path / 'out'}")
    takes_folder = "models_dir" in inspect.signature(create_app).parameters
    extra = {"models_dir": ModelsDir(models)} if takes_folder else {}
    app = create_app(settings, limits or Limits(max_wait_ms=0),
                     start_engine=lambda s, on_event: (ClientsEngine(s, on_event, calls), []),
                     **extra)
    with TestClient(app) as client:
        yield client, calls, takes_folder


# --------------------------------------------------------------------------- test images


def picture(width: int, height: int) -> Image.Image:
    """A photo-like init image: a gradient, a disc and mild noise (it compresses as a photo
    does, not as a flat colour)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                       np.full_like(x, 96)], axis=-1).astype(np.int16)
    disc = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2
    pixels[disc] = (230, 40, 40)
    pixels += np.random.default_rng(0).integers(-6, 7, pixels.shape, dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def mask(width: int, height: int) -> Image.Image:
    """White (draw again) in the middle, black (keep) around it."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_png(value: str) -> Image.Image:
    """A1111's images are raw base64; a `data:` URI is taken too (some servers send one)."""
    raw = base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value,
                           validate=True)
    image = Image.open(io.BytesIO(raw))
    if image.format != "PNG":
        raise ValueError(f"a {image.format} image, not PNG")
    image.load()
    return image


# --------------------------------------------------------------------------- what clients read


def select(value: Any, path: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """The values at `path` (the fixtures' `reads` language, tests/fixtures/clients/README.md)
    and the problems met on the way. A string met where a key is wanted is parsed as JSON first
    (A1111's `info`)."""
    found, problems = [("", value)], []
    for token in re.findall(r"\[-?\d+\]|\[[*+]\]|\{\*\}|[^.\[{]+", path):
        step = []
        for where, item in found:
            if token.startswith("[") and token[1:-1] in "*+":
                if not isinstance(item, list):
                    problems.append(f"{where or 'the answer'} is not a list: {brief(item)}")
                    continue
                if token == "[+]" and not item:
                    problems.append(f"{where or 'the answer'} is an empty list")
                step += [(f"{where}[{k}]", entry) for k, entry in enumerate(item)]
            elif token.startswith("["):
                k = int(token[1:-1])
                if not isinstance(item, list) or not -len(item) <= k < len(item):
                    problems.append(f"missing {where}{token} (got {brief(item)})")
                    continue
                step.append((f"{where}{token}", item[k]))
            elif token == "{*}":
                if not isinstance(item, dict):
                    problems.append(f"{where} is not an object: {brief(item)}")
                    continue
                step += [(f"{where}.{key}", entry) for key, entry in item.items()]
            else:
                item = parsed(item)
                if not isinstance(item, dict) or token not in item:
                    problems.append(f"missing {(where + '.' if where else '') + token} "
                                    f"(got {brief(item)})")
                    continue
                step.append(((where + "." if where else "") + token, item[token]))
        found = step
    return found, problems


def parsed(item: Any) -> Any:
    if isinstance(item, str):
        try:
            return json.loads(item)
        except ValueError:
            return item
    return item


def brief(item: Any) -> str:
    text = json.dumps(item) if not isinstance(item, str) else repr(item)
    return text if len(text) <= 120 else text[:117] + "..."


def type_problem(where: str, item: Any, kind: str) -> str | None:
    if kind.endswith("?") and item is None:
        return None
    kind = kind.rstrip("?")
    checks = {"str": lambda v: isinstance(v, str), "list": lambda v: isinstance(v, list),
              "dict": lambda v: isinstance(v, dict), "bool": lambda v: isinstance(v, bool),
              "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
              "json": lambda v: isinstance(v, str) and isinstance(parsed(v), dict | list)}
    if kind == "png":
        try:
            decode_png(item)
        except Exception as exc:  # any decoding failure is the problem to report
            return f"{where} does not decode as a base64 PNG ({exc})"
        return None
    return None if checks[kind](item) else f"{where} is not {kind}: {brief(item)}"


def read_problems(body: Any, reads: list[str]) -> list[str]:
    problems = []
    for read in reads:
        if read == "(json)":
            continue  # the caller checked that the answer is JSON
        path, _, kind = read.rpartition(":") if ":" in read else (read, "", "")
        found, missing = select(body, path)
        problems += missing
        for where, item in found if kind else ():
            if problem := type_problem(where, item, kind):
                problems.append(problem)
    return problems


# --------------------------------------------------------------------------- one client's flow


class Flow:
    """Replays one client's fixtures against `client`, keeping the answers its later requests
    pick values from, and collecting every problem."""

    def __init__(self, client: TestClient, calls: list[dict], folder: str):
        self.client, self.calls, self.folder = client, calls, folder
        self.answers: dict[str, Any] = {}  # path (no query, no final /) -> its last answer
        self.problems: list[str] = []
        self.switched_to: str | None = None  # the checkpoint title a client switched to

    def run(self) -> None:
        for path in sorted((FIXTURES / self.folder).glob("*.json")):
            fixture = json.loads(path.read_text())
            label = f"{fixture['client']}: {fixture['method']} {fixture['path']} " \
                    f"({self.folder}/{path.name})"
            try:
                self.step(fixture, label)
            except Missing as exc:
                self.problems.append(f"{label}: not sent, it needs {exc}")

    def step(self, fixture: dict, label: str) -> None:
        body = self.fill(fixture.get("body"))
        if fixture.get("body_from"):
            body = {**self.answer(fixture["body_from"]), **body}
        before = len(self.calls)
        response = self.send(fixture, body)
        for _ in range(fixture.get("tries", 1) - 1):
            if self.reached(response, fixture.get("poll_until")):
                break
            time.sleep(0.05)
            response = self.send(fixture, body)
        problems = self.answer_problems(fixture, body, response)
        if not problems and fixture.get("poll_until") and not self.reached(
                response, fixture["poll_until"]):
            problems.append(f"never reached {fixture['poll_until']} in {fixture['tries']} "
                            f"polls (last: {brief(response.json())})")
        if not problems and fixture.get("switches_model"):
            self.switched_to = body["sd_model_checkpoint"]
        if not problems and fixture.get("engine"):
            problems += self.engine_problems(fixture["engine"], self.calls[before:], body)
        self.problems += [f"{label}: {problem}" for problem in problems]

    def send(self, fixture: dict, body: Any):
        method, path = fixture["method"], fixture["path"]
        if method == "GET":
            return self.client.get(path)
        return self.client.post(path, json=body) if body is not None else self.client.post(path)

    def answer_problems(self, fixture: dict, body: Any, response) -> list[str]:
        if fixture.get("status") != "any" and not 200 <= response.status_code < 300:
            return [f"HTTP {response.status_code} {response.text[:300]}"]
        try:
            answer = response.json()
        except ValueError:
            if fixture["reads"] or fixture.get("json_body"):
                return [f"the answer is not JSON: {response.text[:120]!r}"]
            return []
        self.answers[fixture["path"].split("?")[0].rstrip("/")] = answer
        problems = read_problems(answer, fixture["reads"])
        for path, text in fixture.get("contains", {}).items():
            found, missing = select(answer, path)
            problems += missing + [f"{where} lacks {text!r}: {brief(value)}"
                                   for where, value in found if text not in str(value)]
        if fixture["path"] in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
            problems += generated_problems(body, answer)
        return problems

    def reached(self, response, until: dict | None) -> bool:
        if until is None or response.status_code != 200:
            return True
        answer = response.json()
        return all(select(answer, path)[0] and select(answer, path)[0][0][1] == value
                   for path, value in until.items())

    # -- the request's placeholders ------------------------------------------------------

    def answer(self, path: str) -> Any:
        if path not in self.answers:
            raise Missing(f"the answer to {path}, which an earlier request did not give")
        return self.answers[path]

    def fill(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: self.fill(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.fill(item) for item in value]
        if not isinstance(value, str) or not PLACEHOLDER.search(value):
            return value
        whole = PLACEHOLDER.fullmatch(value)
        if whole:
            return self.resolve(whole.group(1))
        return PLACEHOLDER.sub(lambda m: str(self.resolve(m.group(1))), value)

    def resolve(self, name: str) -> Any:
        if name.startswith("pick:"):
            path, _, selector = name[len("pick:"):].partition(":")
            found, problems = select(self.answer(path), selector)
            if problems or len(found) != 1:
                raise Missing(f"{selector} of {path}'s answer ({'; '.join(problems)})")
            return found[0][1]
        if name == "other-model":
            return self.other_model()
        kind, size = name.rsplit(":", 1)
        width, height = (int(n) for n in size.split("x"))
        image = mask(width, height) if kind.endswith("mask") else picture(width, height)
        encoded = png_base64(image)
        return f"data:image/png;base64,{encoded}" if kind.startswith("data:") else encoded

    def other_model(self) -> str:
        """The checkpoint a user picks instead of the current one, from sd-models' titles."""
        options, models = (self.client.get(f"/sdapi/v1/{path}") for path in ("options",
                                                                               "sd-models"))
        current = parsed(options.text).get("sd_model_checkpoint") if options.status_code == \
            200 and isinstance(parsed(options.text), dict) else None
        listed = parsed(models.text) if models.status_code == 200 else None
        if not isinstance(listed, list):
            raise Missing(f"sd-models' titles to pick another model from (GET "
                          f"/sdapi/v1/sd-models: HTTP {models.status_code} {models.text[:120]})")
        titles = [m.get("title") for m in listed if isinstance(m, dict)]
        others = [t for t in titles if t and t != current]
        if not others:
            raise Missing(f"a second checkpoint in sd-models to switch to (titles {titles}, "
                          f"current {current!r}; the models folder has alpha and beta)")
        return others[0]

    # -- what the engine was asked -------------------------------------------------------

    def engine_problems(self, expected: dict, calls: list[dict], body: dict) -> list[str]:
        if not calls:
            return ["the engine was not called"]
        problems = []
        call = calls[0]
        start, generation, hires = call["start"], call["generation"], call["hires"]
        if "start" in expected:
            got = None if start is None else "mask" if start.masks is not None else "image"
            if got != expected["start"]:
                problems.append(f"the engine got start={got}, expected {expected['start']} "
                                "(init_images / mask not passed on)")
        if "strength" in expected and abs(generation.strength - expected["strength"]) > 1e-6:
            problems.append(f"generation.strength {generation.strength}, expected "
                            f"denoising_strength {expected['strength']}")
        if "mask_blur" in expected and (start is None or start.mask_blur != expected["mask_blur"]):
            problems.append(f"mask_blur {getattr(start, 'mask_blur', None)}, expected "
                            f"{expected['mask_blur']}")
        if "hires_scale" in expected and not (hires is not None and hires.enabled and abs(
                hires.scale - expected["hires_scale"]) < 1e-6):
            problems.append(f"the engine got hires={hires}, expected scale "
                            f"{expected['hires_scale']}")
        if "seed" in expected and call["seeds"][0] != expected["seed"]:
            problems.append(f"seed {call['seeds'][0]}, expected {expected['seed']}")
        if "loras" in expected:
            want = [(self.fill(name), weight) for name, weight in expected["loras"]]
            got = [(Path(entry.path).stem, entry.weight) for entry in call["loras"]]
            if [(n, round(w, 6)) for n, w in got] != [(n, round(w, 6)) for n, w in want]:
                problems.append(f"the engine got LoRAs {got}, expected {want}")
        if any("<lora:" in p for c in calls for p in c["prompts"]):
            problems.append(f"a <lora:...> tag reached the engine: {calls[0]['prompts'][0]!r}")
        if expected.get("model") == "switched":
            problems += self.model_problems(call["engine"])
        return problems

    def model_problems(self, engine) -> list[str]:
        if self.switched_to is None:
            return ["no model switch before it to check"]
        models = self.answers.get("/sdapi/v1/sd-models") or self.client.get(
            "/sdapi/v1/sd-models").json()
        chosen = next((m for m in models if m.get("title") == self.switched_to), None)
        if chosen is None:
            return [f"{self.switched_to!r} is no longer in sd-models"]
        if Path(chosen.get("filename", "")).name != engine.components.name:
            return [f"ran on {engine.components.name}, not on the checkpoint the client "
                    f"switched to ({self.switched_to!r})"]
        return []


class Missing(LookupError):
    """A value a request needs that an earlier answer did not give."""


def generated_problems(body: dict, answer: dict) -> list[str]:
    """What every client of txt2img / img2img relies on: batch_size x n_iter images of the size
    asked (hires fix: scaled), and `info` a JSON string with the seeds and infotexts."""
    count = int(body.get("batch_size") or 1) * int(body.get("n_iter") or 1)
    scale = float(body.get("hr_scale", 2)) if body.get("enable_hr") else 1.0
    size = (round(int(body.get("width", 512)) * scale), round(int(body.get("height", 512)) * scale))
    problems = read_problems(answer, ["images:list", "info:json", "info.seed:int",
                                      "info.all_seeds:list", "info.infotexts:list"])
    if problems:
        return problems
    images, info = answer["images"], json.loads(answer["info"])
    if len(images) != count or len(info["all_seeds"]) != count or len(
            info["infotexts"]) != count:
        problems.append(f"{len(images)} images, {len(info['all_seeds'])} seeds and "
                        f"{len(info['infotexts'])} infotexts for batch_size x n_iter = {count}")
    for k, image in enumerate(images):
        try:
            got = decode_png(image).size
        except Exception as exc:  # reported, as the client would fail on it
            problems.append(f"images[{k}] does not decode as PNG ({exc})")
            continue
        if got != size:
            problems.append(f"images[{k}] is {got[0]}x{got[1]}, asked {size[0]}x{size[1]}")
    if not body.get("enable_hr") and (info.get("width"), info.get("height")) != (
            int(body.get("width", 512)), int(body.get("height", 512))):
        problems.append(f"info width x height {info.get('width')}x{info.get('height')}, asked "
                        f"{body.get('width', 512)}x{body.get('height', 512)}")
    return problems


# --------------------------------------------------------------------------- the tests


def test_the_fixtures_say_where_they_come_from():
    """Every fixture names its client's source (repository@commit:path:line), a method, a path
    and what the client reads; every placeholder is one the flows fill."""
    for path in sorted(FIXTURES.glob("*/*.json")):
        fixture = json.loads(path.read_text())
        assert SOURCE.fullmatch(fixture["source"]), (path, fixture["source"])
        assert fixture["method"] in ("GET", "POST") and fixture["path"].startswith("/"), path
        assert isinstance(fixture["reads"], list), path
        text = json.dumps(fixture.get("body"))
        for tag in re.findall(r"<(?:pick|other|data|png|mask)[^<>]*>", text):
            assert PLACEHOLDER.fullmatch(tag), (path, tag)
    assert CLIENTS == ["aiyabot", "librechat", "open_webui", "openoutpaint", "sillytavern",
                       "webuiapi"]


@pytest.mark.parametrize("folder", CLIENTS)
def test_each_client_completes_its_flow(tmp_path, folder):
    """The client's requests in its order (model list, model switch, generate, img2img,
    inpainting, LoRA tags where it has them): every answer has what the client reads."""
    with clients_app(tmp_path) as (client, calls, takes_folder):
        flow = Flow(client, calls, folder)
        flow.run()
    note = "" if takes_folder else " (create_app takes no models_dir: the app ran without " \
        "a models folder)"
    assert not flow.problems, f"{len(flow.problems)} problem(s){note}:\n" + "\n".join(
        flow.problems)


def test_openoutpaint_draws_the_running_preview(tmp_path):
    """openOutpaint polls progress?skip_current_image=false while its img2img runs and draws
    current_image: a base64 PNG preview of the running step (dream.js:449-453)."""
    fixture = json.loads((FIXTURES / "openoutpaint" / "14_img2img_tool.json").read_text())
    with clients_app(tmp_path) as (client, calls, _takes_folder):
        flow = Flow(client, calls, "openoutpaint")
        for listing in ("samplers", "schedulers"):
            flow.answers[f"/sdapi/v1/{listing}"] = client.get(f"/sdapi/v1/{listing}").json()
        try:
            body = flow.fill({**fixture["body"], "batch_size": 1, "n_iter": 1})
        except Missing as exc:
            pytest.fail(f"openOutpaint: POST /sdapi/v1/img2img not sent, it needs {exc}")
        client.app.state.server.engine.step_seconds = 0.1  # 30 steps: 3 s of polling
        worker = threading.Thread(target=client.post, args=("/sdapi/v1/img2img",),
                                  kwargs={"json": body})
        worker.start()
        preview = answer = None
        while worker.is_alive() and preview is None:
            answer = client.get("/sdapi/v1/progress?skip_current_image=false").json()
            preview = answer.get("current_image")
            time.sleep(0.05)
        worker.join(10)
    assert preview is not None, "openOutpaint: GET /sdapi/v1/progress?skip_current_image=false " \
        f"during an img2img never gave a current_image (last answer: {brief(answer)})"
    assert decode_png(preview).size[0] > 0


# --------------------------------------------------------------------------- webuiapi, live


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def live_models(root: Path, foreign_embedding: bool = False) -> Path:
    """A models folder for the bundled model: the model itself, its ring LoRA, an embedding for
    its text encoder (and, with `foreign_embedding`, one for SD 1.x: 768 wide)."""
    bundled = Path(sdaccel.__file__).parent / "bundled"
    shutil.copytree(bundled / "shapes", root / "checkpoints" / "shapes")
    (root / "loras").mkdir()
    shutil.copy(bundled / "loras" / "ring.safetensors", root / "loras")
    (root / "embeddings").mkdir()
    width = json.loads((bundled / "shapes" / "text_encoder" / "config.json").read_text())[
        "hidden_size"]
    save_file({"emb_params": torch.zeros(1, width)}, root / "embeddings" / "shiny.safetensors")
    if foreign_embedding:
        save_file({"emb_params": torch.zeros(1, 768)}, root / "embeddings" / "sd1.safetensors")
    return root


@contextmanager
def live_server(tmp_path: Path, foreign_embedding: bool = False):
    """`sdaccel serve` on the bundled model in a subprocess (with --models-dir when the CLI has
    it); yields (port, the models folder or None). Stopped at the end."""
    port = free_port()
    command = [sys.executable, "-m", "sdaccel", "serve", "--port", str(port),
               "--steps", "4", "--height", "64", "--width", "64", "--max-wait-ms", "0",
               "--set", f"io.out_dir={tmp_path / 'out'}"]
    flags = subprocess.run([sys.executable, "-m", "sdaccel", "serve", "--help"],
                           capture_output=True, text=True, timeout=120).stdout
    models = None
    if "--models-dir" in flags:
        models = live_models(tmp_path / "models", foreign_embedding)
        command += ["--models-dir", str(models), "--model", str(models / "checkpoints/shapes")]
    else:
        command += ["--model", "bundled:shapes"]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        for _ in range(600):
            if server.poll() is not None:
                pytest.fail(f"sdaccel serve exited ({server.returncode}):\n"
                            + (tmp_path / "server.log").read_text()[-3000:])
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield port, models
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


@pytest.mark.slow
def test_webuiapi_drives_a_live_server(tmp_path):
    """The `webuiapi` package (pinned in the test extra) against `sdaccel serve`: txt2img,
    img2img, inpainting, the model list and options, LoRAs and embeddings, png-info, progress
    and interrupt, as a Python user calls them."""
    import webuiapi

    with live_server(tmp_path) as (port, models):
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=4)
        first = api.txt2img(prompt="a red circle on a blue background", seed=5, width=64,
                            height=64)
        assert first.image.size == (64, 64) and first.info["seed"] == 5, first.info
        assert "Seed: 5" in first.info["infotexts"][0]
        again = api.img2img(images=[first.image], prompt="a blue circle", seed=6, width=64,
                            height=64, denoising_strength=0.5)
        assert again.image.size == (64, 64) and again.info["seed"] == 6, again.info
        assert "Denoising strength: 0.5" in again.info["infotexts"][0]
        inpainted = api.img2img(images=[first.image], mask_image=mask(64, 64),
                                prompt="a green square", seed=7, width=64, height=64)
        assert inpainted.image.size == (64, 64) and inpainted.info["seed"] == 7
        check_lists_and_options(api, models)
        described = api.png_info(first.image)
        assert isinstance(described.info, str) and "Seed: 5" in described.info
        check_interrupt(api)


def check_lists_and_options(api, models: Path | None) -> None:
    titles = [m["title"] for m in api.get_sd_models()]
    current = api.util_get_current_model()
    assert current in titles, (current, titles)
    api.set_options({"sd_model_checkpoint": current})  # webuiapi reads the answer as JSON
    assert set(api.get_options()) >= {"sd_model_checkpoint"}
    loras, embeddings = api.get_loras(), api.get_embeddings()
    assert isinstance(loras, list) and set(embeddings) >= {"loaded", "skipped"}
    if models is not None:  # the folder's LoRA and embedding are listed
        assert [lora["name"] for lora in loras] == ["ring"], loras
        assert list(embeddings["loaded"]) == ["shiny"], embeddings


def check_interrupt(api) -> None:
    """A long txt2img in a thread; interrupt once progress shows it running: it answers."""
    done: dict[str, Any] = {}

    def generate():
        done["result"] = api.txt2img(prompt="a yellow star", seed=8, width=64, height=64,
                                     steps=150)

    worker = threading.Thread(target=generate)
    worker.start()
    for _ in range(500):
        state = api.get_progress()["state"]
        if state.get("sampling_step", 0) > 0:
            break
        time.sleep(0.02)
    api.interrupt()
    worker.join(120)
    assert not worker.is_alive() and "result" in done, "txt2img did not return after interrupt"
    for _ in range(100):  # util_wait_for_ready's test: idle again
        progress = api.get_progress()
        if progress["progress"] == 0 and progress["state"]["job_count"] == 0:
            break
        time.sleep(0.05)
    assert progress["state"]["job_count"] == 0, progress


@pytest.mark.slow
def test_an_embedding_for_another_model_is_listed_as_skipped(tmp_path):
    """A1111 users' embeddings folders mix models: A1111 starts, lists the ones that fit its
    model as loaded and the others as skipped. `sdaccel serve --models-dir` does the same."""
    with live_server(tmp_path, foreign_embedding=True) as (port, models):
        import httpx

        assert models is not None, "sdaccel serve has no --models-dir"
        embeddings = httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/embeddings").json()
    assert list(embeddings["loaded"]) == ["shiny"] and list(embeddings["skipped"]) == ["sd1"]
