"""`sdaccel serve`: AUTOMATIC1111's API as its clients send it, batching that keeps every image
its own, the native endpoints, and bad requests answered with the field they got wrong."""

import base64
import io
import json
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import tiny_settings
from PIL import Image

from sdaccel.errors import ConfigError
from sdaccel.serve.app import Limits, create_app
from sdaccel.serve.batcher import Batcher, Interrupted, Job, QueueFull
from sdaccel.serve.models_dir import ModelsDir

# The bundled model at 4 steps: real pictures in well under a second each.
SERVER = ("model_id=bundled:shapes", "generation.height=64", "generation.width=64",
          "sampler.steps=4")
BODY = {"prompt": "a red circle on a blue background", "seed": 11, "steps": 4, "width": 64,
        "height": 64, "cfg_scale": 4.0, "sampler_name": "DPM++ 2M"}


@pytest.fixture(scope="module")
def server():
    app = create_app(tiny_settings(*SERVER), Limits(max_batch=4, max_wait_ms=400, max_queue=8,
                                                    max_pixels=128 * 128, max_body_bytes=1 << 20))
    with TestClient(app) as client:  # the model loads once, as the app starts
        yield client


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def same_as_alone(server, b64: str, prompt: str, seed: int) -> bool:
    """The image the engine makes for this prompt and seed by itself, up to the float rounding
    that batch composition brings on the CPU (8-bit pixels within one level)."""
    engine = server.app.state.server.engine
    own = np.asarray(engine.generate([prompt], seed=seed)[0].image).astype(int)
    return np.abs(pixels(b64).astype(int) - own).max() <= 1


def test_txt2img_answers_like_automatic1111(server):
    # A client sends the whole A1111 body with its defaults.
    full = {**BODY, "negative_prompt": "", "styles": [], "subseed": -1, "subseed_strength": 0,
            "seed_resize_from_h": -1, "seed_resize_from_w": -1, "batch_size": 2, "n_iter": 1,
            "restore_faces": False, "tiling": False, "eta": 0, "s_churn": 0, "s_noise": 1,
            "enable_hr": False, "denoising_strength": 0.7, "override_settings": {},
            "script_args": [], "alwayson_scripts": {}, "send_images": True,
            "save_images": False, "sampler_index": "Euler", "some_future_field": 3}
    response = server.post("/sdapi/v1/txt2img", json=full)
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 and info["all_seeds"] == [11, 12]
    assert info["sampler_name"] == "DPM++ 2M" and info["sd_model_name"] == "bundled:shapes"
    assert info["sdaccel_ignored"] == ["denoising_strength", "some_future_field"]
    assert info["infotexts"][1].endswith("Seed: 12, Size: 64x64, Model: bundled:shapes")
    png = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert png.text["parameters"] == info["infotexts"][0]  # the CLI's PNG metadata
    for k, seed in enumerate((11, 12)):  # each the image it is alone (seed + k, as A1111)
        assert same_as_alone(server, body["images"][k], BODY["prompt"], seed)


def test_concurrent_requests_share_a_batch_and_keep_their_images(server):
    prompts = ["a red circle", "a blue square", "a green star", "a yellow triangle"]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda k: server.post("/sdapi/v1/txt2img", json={
            **BODY, "prompt": prompts[k], "seed": 100 + k}), range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    metrics = server.get("/v1/metrics").text
    merged = [int(n) for n in re.findall(r'sdaccel_batches_total\{images="(\d+)"\}', metrics)]
    assert max(merged) >= 2  # merged, not four single calls
    for k, response in enumerate(responses):
        image = response.json()["images"][0]
        assert same_as_alone(server, image, prompts[k], 100 + k)


def test_a_long_prompt_does_not_share_a_batch_with_a_short_one(server):
    """Chunked prompts pad the others of their batch (changing them): they ride alone."""
    long_prompt = ", ".join(["a red circle on a blue background"] * 12)  # > 75 tokens
    engine = server.app.state.server.engine
    assert engine.prompts.chunk_count(long_prompt, "") > 1
    with ThreadPoolExecutor(2) as pool:
        short, long = pool.map(lambda prompt: server.post("/sdapi/v1/txt2img", json={
            **BODY, "prompt": prompt, "seed": 5}), ["a red circle", long_prompt])
    assert short.status_code == long.status_code == 200
    assert same_as_alone(server, short.json()["images"][0], "a red circle", 5)
    assert same_as_alone(server, long.json()["images"][0], long_prompt, 5)


def test_the_native_endpoint_takes_our_settings_schema(server):
    ok = server.post("/v1/generate", json={"prompt": "a red circle", "seed": 3,
                                           "settings": {"sampler": {"name": "ddim",
                                                                    "steps": 3}}})
    assert ok.status_code == 200, ok.text
    image = ok.json()["images"][0]
    assert (image["sampler"], image["steps"], image["seed"]) == ("ddim", 3, 3)
    fixed = server.post("/v1/generate", json={"prompt": "x", "settings": {"model_id": "y"}})
    assert fixed.status_code == 422 and fixed.json()["field"] == "settings.model_id"
    bad = server.post("/v1/generate", json={"prompt": "x", "settings": {"sampler": {
        "name": "plms"}}})
    assert bad.status_code == 422 and "sampler.name" in bad.json()["detail"]
    health = server.get("/v1/health").json()
    assert health["status"] == "ok" and health["model"] == "bundled:shapes"


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler",
     "valid: Latent, Latent (nearest), Lanczos"),
    ({"restore_faces": True}, "restore_faces", "face restoration"),
    ({"sampler_name": "DPM adaptive"}, "sampler_name", "valid: DDPM, DDIM, DPM++ 2M"),
    ({"sampler_name": "DPM++ 2M Beta"}, "sampler_name", "older combined names"),
    ({"scheduler": "Align Your Steps"}, "scheduler", "valid: Automatic, Karras, Exponential, "
                                                     "SGM Uniform"),
    ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler",
     "sampler.schedule 'karras' is not available with sampler.name 'ddim'"),
    ({"sampler_name": "LCM", "scheduler": "sgm_uniform"}, "scheduler", "valid: default"),
    ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Exponential"}, "scheduler",
     "names the karras schedule already"),
    ({"sampler_name": "Euler", "eta": 0.5}, "eta", "takes no eta; samplers that do: DDIM, TCD"),
    ({"sampler_name": "TCD", "eta": 1.5}, "eta", "less than or equal to 1"),
    ({"width": 60}, "width", "multiple"),
    ({"width": 512, "height": 512}, "width", "--max-pixels"),
    ({"steps": 0}, "steps", "at least 1"),
    ({"steps": 10000}, "steps", "limit 150"),
    ({"batch_size": 0}, "batch_size", "at least 1"),
    ({"batch_size": 9, "n_iter": 2}, "batch_size", "limit 16"),
    ({"seed": "lucky"}, "seed", "integer"),
    ({"override_settings": {"sd_model_checkpoint": "other.safetensors"}},
     "override_settings.sd_model_checkpoint", "bundled:shapes"),
])
def test_requests_we_cannot_honour_are_422_naming_the_field(server, change, field, message):
    response = server.post("/sdapi/v1/txt2img", json={**BODY, **change})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and message in response.json()["detail"]


@pytest.mark.parametrize(("change", "recorded"), [
    ({"sampler_name": "DPM++ 2M Karras"}, "Sampler: DPM++ 2M, Schedule type: Karras, CFG"),
    ({"sampler_name": "DPM++ 2M SDE", "scheduler": "exponential"},
     "Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG"),
    ({"sampler_name": "DDIM", "scheduler": "SGM Uniform", "eta": 0.5},
     "Sampler: DDIM, Schedule type: SGM Uniform, CFG"),
    ({"sampler_name": "TCD", "eta": 0.3, "cfg_scale": 1}, "Sampler: TCD, CFG scale: 1,"),
    ({"sampler_name": "LCM", "cfg_scale": 1, "scheduler": "Automatic"}, "Sampler: LCM, CFG"),
])
def test_schedule_types_old_combined_names_and_eta_are_honoured(server, change, recorded):
    """A1111 1.9+ names a sampler and a schedule type, older clients one combined name; both
    reach the engine (the image is the engine's own for that sampler setting) and the infotext
    records them as A1111 does: the schedule type unless Automatic, an eta unless default."""
    from sdaccel.serve.a1111 import Txt2ImgRequest, sampler_for

    response = server.post("/sdapi/v1/txt2img", json={**BODY, **change})
    assert response.status_code == 200, response.text
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert recorded in infotext
    assert ("Eta DDIM: 0.5" in infotext) == (change.get("eta") == 0.5)
    assert "Eta:" not in infotext  # TCD's 0.3 is its default
    engine = server.app.state.server.engine
    sampler = sampler_for(Txt2ImgRequest(**{**BODY, **change}), engine.settings.sampler)
    generation = engine.settings.generation.model_copy(
        update={"guidance_scale": float(change.get("cfg_scale", BODY["cfg_scale"]))})
    own = engine.generate([BODY["prompt"]], seed=BODY["seed"], generation=generation,
                          sampler=sampler.model_copy(update={"steps": 4}))[0].image
    assert np.abs(pixels(response.json()["images"][0]).astype(int)
                  - np.asarray(own).astype(int)).max() <= 1


@pytest.mark.parametrize("case", ["img2img", "inpaint", "inpaint_fill", "hires"])
def test_img2img_inpainting_and_hires_are_the_engine_s_own_images(server, case):
    """On the bundled model: what img2img (with a mask: inpainting) and txt2img's hires fix
    answer is what the engine draws when handed the same start and settings (which equals
    diffusers' pipelines: tests/test_equivalence.py)."""
    from sdaccel.serve.a1111 import Txt2ImgRequest, sampler_for
    from sdaccel.serve.pictures import fill
    from sdaccel.settings import HiresSettings
    from sdaccel.start import ImageStart

    engine = server.app.state.server.engine
    init = engine.generate(["a blue square on a red background"], seed=3)[0].image
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = {"init_images": [b64png(init)], "mask": b64png(mask), "inpaint_full_res": False,
               "mask_blur": 4, "inpainting_fill": 1}
    fields, call = {
        "img2img": ({"init_images": [b64png(init)], "denoising_strength": 0.5},
                    {"start": ImageStart([init])}),
        "inpaint": ({**inpaint, "denoising_strength": 0.8},
                    {"start": ImageStart([init], [mask], 4)}),
        "inpaint_fill": ({**inpaint, "inpainting_fill": 0},
                         {"start": ImageStart([fill(init, mask)], [mask], 4)}),
        "hires": ({"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.6},
                  {"hires": HiresSettings(enabled=True, scale=2, denoising_strength=0.6)}),
    }[case]
    path = "/sdapi/v1/txt2img" if case == "hires" else "/sdapi/v1/img2img"
    response = server.post(path, json={**BODY, **fields})
    assert response.status_code == 200, response.text
    strength = fields.get("denoising_strength", 0.75) if case != "hires" else 0.75
    generation = engine.settings.generation.model_copy(update={
        "guidance_scale": BODY["cfg_scale"], "strength": strength})
    sampler = sampler_for(Txt2ImgRequest(**BODY), engine.settings.sampler)
    own = engine.generate([BODY["prompt"]], seed=BODY["seed"], generation=generation,
                          sampler=sampler.model_copy(update={"steps": 4}), **call)[0].image
    got = pixels(response.json()["images"][0])
    assert got.shape[:2] == (own.height, own.width) == ((128, 128) if case == "hires"
                                                        else (64, 64))
    assert np.abs(got.astype(int) - np.asarray(own).astype(int)).max() <= 1


def test_malformed_and_oversized_bodies(server):
    broken = server.post("/sdapi/v1/txt2img", content=b'{"prompt": ',
                         headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["field"] == "body"
    huge = server.post("/sdapi/v1/txt2img", json={**BODY, "prompt": "x" * (2 << 20)})
    assert huge.status_code == 413
    assert server.get("/v1/health").status_code == 200  # still serving


def test_samplers_models_options_progress(server):
    names = [s["name"] for s in server.get("/sdapi/v1/samplers").json()]
    assert names == ["DDPM", "DDIM", "DPM++ 2M", "DPM++ 2M SDE", "Euler", "Euler a", "Heun",
                     "LMS", "UniPC", "LCM", "TCD"]
    schedulers = server.get("/sdapi/v1/schedulers").json()
    assert [(s["name"], s["label"]) for s in schedulers] == [
        ("automatic", "Automatic"), ("karras", "Karras"), ("exponential", "Exponential"),
        ("sgm_uniform", "SGM Uniform")]
    assert server.get("/sdapi/v1/sd-models").json()[0]["title"] == "bundled:shapes"
    assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "bundled:shapes"
    assert server.post("/sdapi/v1/options",
                       json={"sd_model_checkpoint": "bundled:shapes"}).status_code == 200
    switch = server.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd15.ckpt"})
    assert switch.status_code == 422 and "not served here" in switch.json()["detail"]
    progress = server.get("/sdapi/v1/progress").json()
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image"}


def test_gallery_lists_recent_images(server):
    server.post("/sdapi/v1/txt2img", json={**BODY, "prompt": "two green squares"})
    page = server.get("/").text
    assert "two green squares" in page and "/v1/images/" in page
    number = page.split('src="/v1/images/')[1].split('"')[0]
    image = server.get(f"/v1/images/{number}")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_save_images_writes_like_the_cli(tmp_path):
    app = create_app(tiny_settings(*SERVER, f"io.out_dir={tmp_path}"), Limits(max_wait_ms=0))
    with TestClient(app) as client:
        response = client.post("/sdapi/v1/txt2img", json={**BODY, "save_images": True,
                                                          "batch_size": 2})
    assert response.status_code == 200, response.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_000_steps4.png",
                                                          "img_001_steps4.png"]


def test_api_key_as_bearer_or_basic_auth():
    app = create_app(tiny_settings(*SERVER), Limits(max_wait_ms=0), api_key="s3cret")
    with TestClient(app) as client:
        assert client.get("/sdapi/v1/samplers").status_code == 401
        bearer = {"Authorization": "Bearer s3cret"}
        assert client.get("/sdapi/v1/samplers", headers=bearer).status_code == 200
        basic = "Basic " + base64.b64encode(b"user:s3cret").decode()
        assert client.get("/sdapi/v1/samplers", headers={"Authorization": basic}
                          ).status_code == 200
        assert client.get("/v1/health").status_code == 200  # no key for health


# --------------------------------------------------------------------------- a fake engine
# The routes over an engine that draws flat images at once: what the server does with requests
# (fields, seeds, batching, limits, keys, interrupts, the gallery) without a model, in
# milliseconds. The tests above, on the real bundled model, are the contract for the pictures.

FAKE_SETTINGS = ("generation.height=64", "generation.width=64", "sampler.steps=4")


class FakeEngine:
    """The Engine methods the server uses. Image k is flat, its red channel seed % 256 and its
    green the model's tag, so a test reads the seed and the model that made it; `hold` (an
    Event) pauses every step until it is set."""

    def __init__(self, settings, on_event):
        self.settings, self.on_event = settings, on_event
        self.components = SimpleNamespace(name="fake.safetensors", model_hash="0123abcd")
        self.device = "cpu"
        self.prompts = SimpleNamespace(chunk_count=lambda prompt, negative: 1 + len(prompt) // 100)
        self.calls: list[dict] = []
        self.hold: threading.Event | None = None
        self.running = threading.Event()
        # the green of its images: which model drew them (a models folder's checkpoints)
        self.tag = {"alpha": 60, "beta": 120}.get(Path(settings.model_id).stem, 180)

    def check_size(self, height, width):
        for key, value in (("generation.height", height), ("generation.width", width)):
            if value % 16:
                raise ConfigError(f"{key}: {value} is not a multiple of 16", key=key)

    def generate(self, prompts, negative_prompt="", seed=None, generation=None, sampler=None,
                 loras=None, on_step=None, start=None, hires=None):
        from sdaccel.engine.engine import ImageResult
        from sdaccel.events import StepDone

        generation = generation or self.settings.generation
        sampler = sampler or self.settings.sampler
        hires = hires if hires is not None else self.settings.hires
        self.calls.append({"prompts": list(prompts), "seeds": list(seed), "sampler": sampler,
                           "generation": generation, "loras": loras, "start": start,
                           "hires": hires, "model": self.settings.model_id})
        self.running.set()
        for step in range(1, sampler.steps + 1):
            self.on_event(StepDone(step, sampler.steps, len(prompts)))
            if on_step is not None:
                on_step(SimpleNamespace(step=step, total_steps=sampler.steps,
                                        latents=[[step]] * len(prompts)))
            if self.hold is not None:
                self.hold.wait(5)
        if hires.enabled:  # the engine rounds the size to its grid
            generation = generation.model_copy(update={
                "width": round(generation.width * hires.scale / 16) * 16,
                "height": round(generation.height * hires.scale / 16) * 16})
        size = (generation.width, generation.height)
        steps = sampler.steps
        return [ImageResult(prompt=p, negative_prompt=negative_prompt, seed=k, steps=steps,
                            nfe=2 * steps, cost=float(steps), decisions="F" * steps,
                            image=Image.new("RGB", size, (k % 256, self.tag, 0)), latents=None,
                            seconds=0.0, generation=generation,
                            strength=generation.strength if start else None,
                            mask_blur=start.mask_blur if start and start.masks else None,
                            hires=hires if hires.enabled else None)
                for p, k in zip(prompts, seed, strict=True)]

    def decode(self, latents):
        """A preview: blue, its green the step it was taken at."""
        return [Image.new("RGB", (8, 8), (0, row[0], 255)) for row in latents]


@contextmanager
def fake_server(*overrides, limits=None, api_key=None, models_dir=None, engines=None,
                gate=None):
    """A TestClient on an app over a FakeEngine (one per model loaded, appended to `engines`;
    every one after the first waits for `gate`, an Event, if given); yields (client, the first
    engine)."""
    engines = [] if engines is None else engines

    def start(settings, on_event):
        if engines and gate is not None:
            gate.wait(5)
        engines.append(FakeEngine(settings, on_event))
        return engines[-1], []

    app = create_app(tiny_settings(*FAKE_SETTINGS, *overrides), limits or Limits(max_wait_ms=0),
                     api_key, start_engine=start,
                     models_dir=None if models_dir is None else ModelsDir(models_dir))
    with TestClient(app) as client:
        yield client, engines[0]
    if models_dir is None:
        assert len(engines) == 1  # built once


def red(b64: str) -> int:
    return int(pixels(b64)[0, 0, 0])


def test_fake_txt2img_seeds_each_image_as_a1111_does():
    """n_iter batches of batch_size images: image k gets seed + k, in one engine call when they
    fit; the infotext and PNG metadata name each image's own seed."""
    with fake_server() as (client, engine):
        response = client.post("/sdapi/v1/txt2img", json={**BODY, "seed": 7, "batch_size": 2,
                                                          "n_iter": 2})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["all_seeds"] == [7, 8, 9, 10] and info["sd_model_name"] == "fake.safetensors"
    assert [red(b64) for b64 in response.json()["images"]] == [7, 8, 9, 10]
    assert [k for call in engine.calls for k in call["seeds"]] == [7, 8, 9, 10]
    assert engine.calls[0]["sampler"].name == "dpm_solver++" and engine.calls[0][
        "sampler"].steps == 4
    assert info["infotexts"][3].endswith("Seed: 10, Size: 64x64, Model hash: 0123abcd, "
                                         "Model: fake.safetensors")


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/sdapi/v1/txt2img", {**BODY, "width": 72}, "width"),  # the model's own size check
    ("/sdapi/v1/txt2img", {**BODY, "height": 40}, "height"),
    ("/sdapi/v1/txt2img", {**BODY, "steps": 151}, "steps"),
    ("/sdapi/v1/txt2img", {**BODY, "sampler_name": "Euler", "eta": 0.5}, "eta"),
    ("/v1/generate", {"prompt": "x", "settings": {"generation": {"width": 72}}}, "width"),
    ("/v1/generate", {"prompt": "x", "settings": {"sampler": {"name": "ddim",
                                                              "schedule": "karras"}}},
     "settings.sampler.schedule"),
    ("/v1/generate", {"prompt": "x", "settings": {"sampler": {"steps": 0}}},
     "settings.sampler.steps"),
    ("/v1/generate", {"prompt": "x", "settings": {"model_id": "y"}}, "settings.model_id"),
    ("/v1/generate", {"prompt": "x", "colour": "red"}, "colour"),
])
def test_fake_refusals_name_the_field(path, body, field):
    with fake_server() as (client, engine):
        response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert engine.calls == []


def test_a_config_error_carries_its_key_to_the_field():
    """The server reads ConfigError.key, never the message: a check across keys names the key
    it is about (a Problem), a plain check where it was found."""
    from sdaccel.settings import layer_over

    settings = tiny_settings(*FAKE_SETTINGS)
    for overrides, key in ((["sampler.name=ddim", "sampler.schedule=karras"], "sampler.schedule"),
                           (["sampler.name=euler", "sampler.eta=0.5"], "sampler.eta"),
                           (["generation.height=60"], "generation.height"),
                           (["adaptive.enabled=true", "adaptive.mode=per_step",
                             "sampler.name=heun"], "adaptive.mode"),
                           (["sampler.colour=1"], "sampler.colour"),
                           (["seed.x=1"], "seed")):  # a value, not a section
        with pytest.raises(ConfigError) as caught:
            layer_over(settings, overrides=overrides)
        assert caught.value.key == key, (overrides, caught.value.key)
    assert ConfigError("no key").key is None


def test_fake_native_generate_takes_per_request_settings():
    with fake_server() as (client, engine):
        response = client.post("/v1/generate", json={
            "prompt": "a red circle", "seed": 5, "num_images": 3,
            "settings": {"sampler": {"name": "ddim", "steps": 2},
                         "generation": {"guidance_scale": 2.5}}})
        health = client.get("/v1/health").json()
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [(i["seed"], i["sampler"], i["steps"]) for i in images] == [
        (5, "ddim", 2), (6, "ddim", 2), (7, "ddim", 2)]
    assert engine.calls[0]["generation"].guidance_scale == 2.5
    assert health == {"status": "ok", "model": "fake.safetensors", "queued_images": 0,
                      "device": "cpu"}


def test_fake_api_key_body_limit_and_metrics():
    with fake_server(limits=Limits(max_wait_ms=0, max_body_bytes=1000),
                     api_key="s3cret") as (client, _engine):
        assert client.post("/sdapi/v1/txt2img", json=BODY).status_code == 401
        assert client.post("/v1/generate", json={"prompt": "x"}).status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        assert client.post("/sdapi/v1/txt2img", json=BODY, headers=key).status_code == 200
        wrong = "Basic " + base64.b64encode(b"user:nope").decode()
        assert client.get("/sdapi/v1/samplers", headers={"Authorization": wrong}
                          ).status_code == 401
        huge = client.post("/sdapi/v1/txt2img", headers=key,
                           json={**BODY, "prompt": "x" * 2000})
        assert huge.status_code == 413 and "limit of 1000 bytes" in huge.json()["detail"]
        for open_path in ("/v1/health", "/v1/metrics"):
            assert client.get(open_path).status_code == 200
        metrics = client.get("/v1/metrics").text
    assert 'sdaccel_requests_total{path="/sdapi/v1/txt2img",status="401"} 1' in metrics
    assert 'sdaccel_requests_total{path="/sdapi/v1/txt2img",status="413"} 1' in metrics
    assert 'sdaccel_requests_total{path="/sdapi/v1/txt2img",status="200"} 1' in metrics
    assert "sdaccel_images_total 1" in metrics


def test_fake_queue_full_progress_and_interrupt():
    """While a batch runs: progress shows its step, a request beyond the queue gets 503 with
    Retry-After, and an interrupt ends the running batch (its request answers with no images)
    while the queued one still runs."""
    with fake_server(limits=Limits(max_wait_ms=0, max_batch=1, max_queue=1)) as (client,
                                                                                  engine):
        engine.hold = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/sdapi/v1/txt2img", json=BODY)
            assert engine.running.wait(5)
            second = pool.submit(client.post, "/sdapi/v1/txt2img", json={**BODY, "seed": 30})
            server = client.app.state.server
            for _ in range(500):
                if server.queued():
                    break
                time.sleep(0.01)
            busy = client.post("/sdapi/v1/txt2img", json=BODY)
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "2"
            progress = client.get("/sdapi/v1/progress").json()
            assert progress["state"]["sampling_step"] == 1
            assert progress["state"]["sampling_steps"] == 4
            assert progress["state"]["job_count"] == 2
            assert client.post("/sdapi/v1/interrupt").status_code == 200
            engine.hold.set()
            stopped, served = first.result(10), second.result(10)
    assert stopped.status_code == 200 and stopped.json()["images"] == []
    assert json.loads(stopped.json()["info"])["interrupted"] is True
    assert [red(b64) for b64 in served.json()["images"]] == [30]


def test_fake_gallery_and_the_models_lists():
    with fake_server() as (client, _engine):
        assert "No images yet" in client.get("/").text
        client.post("/sdapi/v1/txt2img", json={**BODY, "prompt": "two <b>green</b> squares"})
        page = client.get("/").text
        number = page.split('src="/v1/images/')[1].split('"')[0]
        image = client.get(f"/v1/images/{number}")
        missing = client.get("/v1/images/999")
        models = client.get("/sdapi/v1/sd-models").json()
        options = client.get("/sdapi/v1/options").json()
        switch = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
    assert "two &lt;b&gt;green&lt;/b&gt; squares" in page and "1 image(s)" in page
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert missing.status_code == 404
    assert models[0]["title"] == "fake.safetensors" and models[0]["hash"] == "0123abcd"
    assert options["sd_model_checkpoint"] == "fake.safetensors"
    assert switch.status_code == 422 and switch.json()["field"] == "sd_model_checkpoint"


def test_the_engine_starts_once_whoever_starts_it():
    """`sdaccel serve` starts the server before uvicorn (a model that cannot load is one line);
    the lifespan then finds it started. The batcher stops when the app does."""
    started = []

    def start(settings, on_event):
        started.append(FakeEngine(settings, on_event))
        return started[-1], []

    app = create_app(tiny_settings(*FAKE_SETTINGS), Limits(max_wait_ms=0), start_engine=start)
    app.state.server.start()
    with TestClient(app) as client:
        assert client.post("/sdapi/v1/txt2img", json=BODY).status_code == 200
    assert len(started) == 1 and app.state.server.batcher is None


# --------------------------------------------------------------------------- img2img, hires, lists
# What the A1111 clients of issue 30 send (webuiapi, openOutpaint, SillyTavern, Open WebUI,
# aiyabot, LibreChat), on the fake engine.


def b64png(image: Image.Image, **chunks: str) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


GREY = Image.new("RGB", (96, 64), (128, 128, 128))


def test_fake_img2img_takes_base64_and_data_uris_at_its_strength():
    with fake_server() as (client, engine):
        plain = client.post("/sdapi/v1/img2img", json={
            **BODY, "init_images": [b64png(GREY)], "denoising_strength": 0.4})
        uri = client.post("/sdapi/v1/img2img", json={
            **BODY, "init_images": ["data:image/png;base64," + b64png(GREY)], "batch_size": 2})
    assert plain.status_code == uri.status_code == 200, plain.text + uri.text
    call = engine.calls[0]
    assert call["generation"].strength == 0.4 and call["start"].masks is None
    assert call["start"].images[0].size == (96, 64)  # the engine resizes (A1111's mode 0)
    assert engine.calls[1]["generation"].strength == 0.75  # A1111's default
    assert len(engine.calls[1]["start"].images) == 2  # one init image serves the batch
    info = json.loads(plain.json()["info"])
    assert info["denoising_strength"] == 0.4
    assert "Denoising strength: 0.4" in info["infotexts"][0]
    assert plain.json()["parameters"]["init_images"] is None  # not echoed back, as A1111
    assert decoded(plain.json()["images"][0]).size == (64, 64)


def test_fake_img2img_several_init_images_set_the_batch_as_a1111():
    one, two = Image.new("RGB", (64, 64), (1, 1, 1)), Image.new("RGB", (64, 64), (2, 2, 2))
    with fake_server() as (client, engine):
        ok = client.post("/sdapi/v1/img2img", json={
            **BODY, "init_images": [b64png(one), b64png(two)], "batch_size": 4, "seed": 3})
        many = client.post("/sdapi/v1/img2img", json={
            **BODY, "init_images": [b64png(one)] * 3, "batch_size": 2})
    assert ok.status_code == 200 and json.loads(ok.json()["info"])["all_seeds"] == [3, 4]
    assert [i.getpixel((0, 0)) for i in engine.calls[0]["start"].images] == [(1, 1, 1),
                                                                             (2, 2, 2)]
    assert many.status_code == 422 and many.json()["field"] == "init_images"


def mask_image(size=(64, 64), box=(16, 16, 48, 48)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_fake_inpainting_fill_original_and_the_mask():
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    picture.paste((30, 30, 200), (0, 0, 32, 64))
    base = {**BODY, "init_images": [b64png(picture)], "mask": b64png(mask_image()),
            "inpaint_full_res": False, "mask_blur": 2}
    with fake_server() as (client, engine):
        filled = client.post("/sdapi/v1/img2img", json={**base, "inpainting_fill": 0})
        original = client.post("/sdapi/v1/img2img", json={**base, "inpainting_fill": 1})
        inverted = client.post("/sdapi/v1/img2img", json={**base, "inpainting_mask_invert": 1})
        noise = client.post("/sdapi/v1/img2img", json={**base, "inpainting_fill": 2})
        latent = client.post("/sdapi/v1/img2img", json={**base, "inpainting_fill": 2,
                                                        "denoising_strength": 1})
    assert filled.status_code == original.status_code == inverted.status_code == 200
    fill_start, original_start = engine.calls[0]["start"], engine.calls[1]["start"]
    assert fill_start.mask_blur == 2 and fill_start.masks[0].getpixel((32, 32)) == 255
    assert original_start.images[0].getpixel((20, 20)) == (30, 30, 200)  # left as it was
    # the masked area: a blur of the rest, blue at its left edge to red at its right
    blurred = [fill_start.images[0].getpixel((x, 32)) for x in (24, 32, 40)]
    assert blurred[0][0] < blurred[1][0] < blurred[2][0] and blurred[1] != (200, 30, 30)
    assert fill_start.images[0].getpixel((4, 4)) == (30, 30, 200)  # outside: untouched
    assert engine.calls[2]["start"].masks[0].getpixel((32, 32)) == 0
    assert noise.status_code == 422 and noise.json()["field"] == "inpainting_fill"
    assert "valid: 0 (fill), 1 (original)" in noise.json()["detail"]
    assert latent.status_code == 200  # openOutpaint's outpainting: the area starts from noise
    assert engine.calls[3]["generation"].strength == 1.0
    assert "Mask blur: 2" in json.loads(original.json()["info"])["infotexts"][0]


def test_fake_inpaint_full_res_draws_the_masked_region_and_pastes_it_back():
    """A1111's default (inpaint_full_res true): the box around the mask, padded and widened to
    the output's aspect, is drawn at width x height and pasted back into the full image."""
    picture = Image.new("RGB", (256, 128), (0, 90, 0))
    mask = mask_image((256, 128), (100, 40, 130, 60))
    with fake_server() as (client, engine):
        response = client.post("/sdapi/v1/img2img", json={
            **BODY, "init_images": [b64png(picture)], "mask": b64png(mask), "seed": 250,
            "mask_blur": 0, "inpaint_full_res_padding": 8})
    assert response.status_code == 200, response.text
    crop = engine.calls[0]["start"].images[0]
    assert crop.size == (46, 46)  # (92..138) x (27..73): 30x20, 8 more each side, squared
    result = decoded(response.json()["images"][0]).convert("RGB")
    assert result.size == (256, 128)  # the full image comes back
    assert result.getpixel((115, 50)) == (250, engine.tag, 0)  # drawn (red: the seed)
    assert result.getpixel((10, 10)) == result.getpixel((140, 50)) == (0, 90, 0)  # kept


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"init_images": ["bm90IGFuIGltYWdl"]}, "init_images.0", "not an image"),
    ({"init_images": ["%%%"]}, "init_images.0", "not base64"),
    ({"init_images": [b64png(GREY)[:200]]}, "init_images.0", "truncated or damaged"),
    ({"init_images": ["http://example.com/a.png"]}, "init_images.0", "URLs are not fetched"),
    ({"init_images": []}, "init_images", "at least one"),
    ({"mask": "bm90IGFuIGltYWdl"}, "mask", "not an image"),
    ({"denoising_strength": 0}, "denoising_strength", "greater than 0"),
    ({"denoising_strength": 1.5}, "denoising_strength", "less than or equal to 1"),
    ({"resize_mode": 1}, "resize_mode", "valid: 0"),
    ({"inpainting_fill": 3}, "inpainting_fill", "latent nothing"),
    ({"mask_blur_x": 4, "mask_blur_y": 8}, "mask_blur_x", "send mask_blur"),
    ({"latent_mask": "x"}, "latent_mask", "not implemented"),
])
def test_fake_img2img_refusals_name_the_field_and_the_server_goes_on(change, field, message):
    with fake_server() as (client, engine):
        response = client.post("/sdapi/v1/img2img", json={
            **BODY, "init_images": [b64png(GREY)], **change})
        assert client.get("/v1/health").status_code == 200
        assert client.post("/sdapi/v1/txt2img", json=BODY).status_code == 200
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and message in response.json()["detail"]
    assert len(engine.calls) == 1  # only the txt2img after it


def test_fake_a_mask_of_another_size_is_stretched_to_the_image():
    with fake_server() as (client, engine):
        response = client.post("/sdapi/v1/img2img", json={
            **BODY, "init_images": [b64png(GREY)], "inpaint_full_res": False,
            "mask": b64png(mask_image((48, 32), (0, 0, 24, 32)))})  # the left half
    assert response.status_code == 200, response.text
    mask = engine.calls[0]["start"].masks[0]
    assert mask.size == (96, 64) and mask.getpixel((10, 10)) == 255
    assert mask.getpixel((80, 10)) == 0


def test_fake_hires_fix_fields_reach_the_engine():
    with fake_server(limits=Limits(max_wait_ms=0, max_pixels=256 * 256)) as (client, engine):
        response = client.post("/sdapi/v1/txt2img", json={
            **BODY, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent (nearest)",
            "hr_second_pass_steps": 3, "denoising_strength": 0.55})
        by_size = client.post("/sdapi/v1/txt2img", json={
            **BODY, "enable_hr": True, "hr_resize_x": 96, "hr_upscaler": "Lanczos"})
    assert response.status_code == by_size.status_code == 200, response.text
    hires = engine.calls[0]["hires"]
    assert (hires.enabled, hires.scale, hires.upscaler, hires.steps,
            hires.denoising_strength) == (True, 2.0, "latent-nearest", 3, 0.55)
    assert decoded(response.json()["images"][0]).size == (128, 128)
    info = json.loads(response.json()["info"])
    assert info["denoising_strength"] == 0.55 and "Hires upscale: 2" in info["infotexts"][0]
    assert "denoising_strength" not in info["sdaccel_ignored"]
    assert engine.calls[1]["hires"].scale == 1.5 and engine.calls[1]["hires"].upscaler == \
        "lanczos"
    assert engine.calls[1]["hires"].denoising_strength == 0.75  # A1111's default


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler", "valid: Latent, Latent (nearest), Lanczos"),
    ({"hr_scale": 1}, "hr_scale", "greater than 1"),
    ({"hr_scale": 4}, "hr_scale", "--max-pixels"),
    ({"hr_second_pass_steps": 500}, "hr_second_pass_steps", "limit 150"),
    ({"denoising_strength": 0}, "denoising_strength", "greater than 0"),
    ({"hr_prompt": "something else"}, "hr_prompt", "own prompt"),
    ({"hr_sampler_name": "Euler"}, "hr_sampler_name", "own prompt, sampler"),
    ({"hr_resize_x": 128, "hr_resize_y": 64}, "hr_resize_x", "cropping"),
])
def test_fake_hires_refusals_name_the_field(change, field, message):
    with fake_server(limits=Limits(max_wait_ms=0, max_pixels=192 * 192)) as (client, engine):
        response = client.post("/sdapi/v1/txt2img", json={**BODY, "enable_hr": True, **change})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and message in response.json()["detail"]
    assert engine.calls == []


def test_fake_sampler_index_random_seed_and_override_settings():
    with fake_server() as (client, engine):
        response = client.post("/sdapi/v1/txt2img", json={
            **{k: v for k, v in BODY.items() if k != "sampler_name"}, "sampler_index": "Euler a",
            "seed": -1, "batch_size": 2, "n_iter": 2, "override_settings": {
                "CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic", "some_option": 1}})
        vae = client.post("/sdapi/v1/txt2img", json={
            **BODY, "override_settings": {"sd_vae": "vae-ft-mse.safetensors"}})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    first = info["all_seeds"][0]
    assert info["all_seeds"] == [first, first + 1, first + 2, first + 3] and first >= 0
    assert engine.calls[0]["sampler"].name == "euler_a" and info["sampler_name"] == "Euler a"
    assert info["sdaccel_ignored"] == ["override_settings.CLIP_stop_at_last_layers",
                                       "override_settings.some_option"]
    assert vae.status_code == 422 and vae.json()["field"] == "override_settings.sd_vae"


def test_fake_the_lists_clients_read_at_start():
    """Each client's start-up GETs, in A1111's shapes; trailing slashes too."""
    with fake_server() as (client, _engine):
        got = {path: client.get(f"/sdapi/v1/{path}") for path in (
            "sd-models", "upscalers", "latent-upscale-modes", "sd-vae", "face-restorers",
            "scripts", "loras", "embeddings", "cmd-flags", "options/", "samplers/",
            "schedulers", "prompt-styles", "hypernetworks")}
    assert {path: r.status_code for path, r in got.items()} == dict.fromkeys(got, 200)
    body = {path: r.json() for path, r in got.items()}
    assert set(body["sd-models"][0]) == {"title", "model_name", "hash", "sha256", "filename",
                                         "config"}
    assert body["upscalers"] == [{"name": "Lanczos", "model_name": None, "model_path": None,
                                  "model_url": None, "scale": 4}]
    assert body["latent-upscale-modes"] == [{"name": "Latent"}, {"name": "Latent (nearest)"}]
    assert body["sd-vae"] == body["face-restorers"] == body["loras"] == []
    assert body["scripts"] == {"txt2img": [], "img2img": []}
    assert body["embeddings"] == {"loaded": {}, "skipped": {}}
    assert body["cmd-flags"]["api"] is True and body["cmd-flags"]["lora_dir"] is None
    assert body["options/"]["sd_model_checkpoint"] == "fake.safetensors"
    assert "sd_checkpoint_hash" in body["options/"]


def test_fake_options_round_trip_and_a_trailing_slash():
    """Open WebUI posts the whole options dict back with one key changed; openOutpaint posts to
    `options/`."""
    with fake_server() as (client, _engine):
        options = client.get("/sdapi/v1/options").json()
        back = client.post("/sdapi/v1/options", json={**options, "samples_format": "jpg",
                                                      "some_extension_key": [1, 2]})
        slash = client.post("/sdapi/v1/options/", json={"sd_model_checkpoint":
                                                        options["sd_model_checkpoint"]})
        wrong = client.post("/sdapi/v1/options/", json={"sd_model_checkpoint": "x.ckpt"})
        txt = client.post("/sdapi/v1/txt2img/", json=BODY)
    assert back.status_code == slash.status_code == txt.status_code == 200
    assert wrong.status_code == 422 and "--models-dir" in wrong.json()["detail"]


def test_fake_png_info_reads_the_parameters_back():
    with fake_server() as (client, _engine):
        image = client.post("/sdapi/v1/txt2img", json={**BODY, "negative_prompt": "blurry"}
                            ).json()["images"][0]
        info = client.post("/sdapi/v1/png-info", json={"image": image}).json()
        plain = client.post("/sdapi/v1/png-info", json={"image": b64png(GREY)}).json()
        bad = client.post("/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"})
    params = info["parameters"]
    assert info["info"].startswith(BODY["prompt"])
    assert params["Prompt"] == BODY["prompt"] and params["Negative prompt"] == "blurry"
    assert (params["Seed"], params["Size-1"], params["Size-2"]) == ("11", "64", "64")
    assert params["Sampler"] == "DPM++ 2M" and "sdaccel" in info["items"]
    assert plain == {"info": "", "items": {}, "parameters": {}}
    assert bad.status_code == 422 and bad.json()["field"] == "image"


def test_fake_progress_preview_skip_current_image_and_skip():
    """openOutpaint polls progress for current_image: the next step of the running batch is
    decoded; skip_current_image leaves it out; /skip drops the running batch of a request and
    keeps its other batches."""
    with fake_server(limits=Limits(max_wait_ms=0, max_batch=1)) as (client, engine):
        engine.hold = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.post, "/sdapi/v1/txt2img", json={**BODY, "n_iter": 2})
            assert engine.running.wait(5)
            first = client.get("/sdapi/v1/progress?skip_current_image=false").json()
            engine.hold.set()  # step 2 decodes the preview asked for
            engine.hold.clear()
            for _ in range(500):
                if client.app.state.server.preview:
                    break
                time.sleep(0.01)
            polled = client.get("/sdapi/v1/progress").json()
            hidden = client.get("/sdapi/v1/progress?skip_current_image=true").json()
            assert client.post("/sdapi/v1/skip").status_code == 200
            engine.hold.set()
            response = running.result(10)
    assert first["current_image"] is None and first["state"]["job_count"] == 2
    assert decoded(polled["current_image"]).getpixel((0, 0))[2] == 255  # a decoded step
    assert hidden["current_image"] is None
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert json.loads(response.json()["info"])["all_seeds"] == [12]  # the first batch skipped


def test_fake_the_api_key_guards_prompts_images_and_previews():
    """One txt2img with the key; then the gallery, the image, the progress preview, png-info and
    the lists that name files want it too; /v1/health does not. The gallery takes the key once
    (?key= or the form) into an HttpOnly cookie, which opens only what a page reads."""
    key = {"Authorization": "Bearer s3cret"}
    with fake_server(api_key="s3cret") as (client, _engine):
        assert client.post("/sdapi/v1/txt2img", json=BODY, headers=key).status_code == 200
        for path in ("/", "/v1/images/0", "/sdapi/v1/progress", "/sdapi/v1/sd-models",
                     "/sdapi/v1/loras", "/sdapi/v1/cmd-flags", "/sdapi/v1/options/"):
            assert client.get(path).status_code == 401, path
        assert client.post("/sdapi/v1/png-info", json={"image": ""}).status_code == 401
        assert "API key" in client.get("/").text  # the form
        assert client.get("/v1/health").status_code == 200
        wrong = client.get("/?key=nope", follow_redirects=False)
        assert wrong.status_code == 401 and "Wrong key" in wrong.text
        signed = client.get("/?key=s3cret", follow_redirects=False)
        assert signed.status_code == 303 and "HttpOnly" in signed.headers["set-cookie"]
        assert "s3cret" not in signed.headers["set-cookie"]
        assert client.get("/").status_code == 200  # the cookie, kept by the client
        assert client.get("/v1/images/0").status_code == 200
        assert client.post("/sdapi/v1/txt2img", json=BODY).status_code == 401  # reading only
        client.cookies.clear()
        form = client.post("/login", data={"key": "s3cret"}, follow_redirects=False)
        assert form.status_code == 303 and client.get("/").status_code == 200


def test_fake_body_limit_names_it_even_without_a_length():
    with fake_server(limits=Limits(max_wait_ms=0, max_body_bytes=2 << 20)) as (client, _e):
        big = client.post("/sdapi/v1/img2img", json={**BODY, "init_images": ["A" * (3 << 20)]})

        def chunks():
            yield json.dumps({**BODY, "prompt": "x" * (3 << 20)}).encode()

        streamed = client.post("/sdapi/v1/txt2img", content=chunks(),
                               headers={"content-type": "application/json"})
        assert client.get("/v1/health").status_code == 200
    for response in (big, streamed):
        assert response.status_code == 413, response.text
        assert "--max-body-mb 2" in response.json()["detail"]


# --------------------------------------------------------------------------- a models folder


@pytest.fixture
def models(tmp_path):
    """A1111's layout: two checkpoints (any bytes: the fake engine reads none), two LoRAs, an
    embedding sdaccel cannot read, and a secret and a link out of the folder."""
    root = tmp_path / "models"
    for folder in ("Stable-diffusion", "Lora", "embeddings"):
        (root / folder).mkdir(parents=True)
    (root / "Stable-diffusion" / "alpha.safetensors").write_bytes(b"alpha")
    (root / "Stable-diffusion" / "beta.safetensors").write_bytes(b"beta")
    (root / "Lora" / "ink.safetensors").write_bytes(b"ink")
    (root / "Lora" / "paper.safetensors").write_bytes(b"paper")
    (root / "embeddings" / "broken.pt").write_bytes(b"not an embedding")
    (tmp_path / "secret.safetensors").write_bytes(b"secret")
    (root / "Lora" / "out.safetensors").symlink_to(tmp_path / "secret.safetensors")
    return root


def test_fake_models_folder_lists_and_switches(models):
    engines = []
    with fake_server(models_dir=models, engines=engines) as (client, first):
        listed = client.get("/sdapi/v1/sd-models").json()
        titles = [m["title"] for m in listed]
        switched = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta"})
        options = client.get("/sdapi/v1/options").json()
        drawn = client.post("/sdapi/v1/txt2img", json=BODY)
        once = client.post("/sdapi/v1/txt2img", json={
            **BODY, "override_settings": {"sd_model_checkpoint": titles[1]}})
        loras = client.get("/sdapi/v1/loras").json()
        embeddings = client.get("/sdapi/v1/embeddings").json()
        flags = client.get("/sdapi/v1/cmd-flags").json()
    assert titles[0] == "fake.safetensors" and titles[1].startswith("alpha.safetensors [")
    assert listed[2]["model_name"] == "beta" and len(listed[2]["sha256"]) == 64
    assert switched.status_code == 200 and options["sd_model_checkpoint"] == titles[2]
    assert options["sd_checkpoint_hash"] == listed[2]["sha256"]
    assert [e.settings.model_id for e in engines[1:]] == [listed[2]["filename"],
                                                          listed[1]["filename"]]
    assert red(drawn.json()["images"][0]) == 11
    assert pixels(drawn.json()["images"][0])[0, 0, 1] == engines[1].tag
    assert json.loads(drawn.json()["info"])["sd_model_name"] == "beta"
    assert "Model: beta" in json.loads(drawn.json()["info"])["infotexts"][0]
    assert json.loads(once.json()["info"])["sd_model_name"] == "alpha"
    assert [lora["name"] for lora in loras] == ["ink", "paper"]  # the link out is not listed
    assert embeddings == {"loaded": {}, "skipped": {"broken": {
        "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
        "vectors": None}}}
    assert flags["lora_dir"] == str(models / "Lora")
    assert first.calls == []


@pytest.mark.parametrize("name", ["gamma", "../secret.safetensors", "/etc/passwd",
                                  "Stable-diffusion/alpha.safetensors", "..", 7])
def test_fake_unknown_or_path_checkpoint_names_are_refused(models, name):
    with fake_server(models_dir=models) as (client, _engine):
        switch = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        once = client.post("/sdapi/v1/txt2img", json={
            **BODY, "override_settings": {"sd_model_checkpoint": name}})
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == \
            "fake.safetensors"
    assert switch.status_code == 422 and switch.json()["field"] == "sd_model_checkpoint"
    assert once.status_code == 422
    assert once.json()["field"] == "override_settings.sd_model_checkpoint"
    if name == "gamma":
        assert "valid: fake.safetensors, alpha.safetensors [" in switch.json()["detail"]


def test_fake_lora_tags_load_the_folder_s_loras_by_name(models):
    with fake_server(models_dir=models) as (client, engine):
        ok = client.post("/sdapi/v1/txt2img", json={
            **BODY, "prompt": "a red circle <lora:ink:0.6>, <lora:paper>"})
        plain = client.post("/sdapi/v1/txt2img", json=BODY)
        assert plain.status_code == 200
        bad = {name: client.post("/sdapi/v1/txt2img", json={
            **BODY, "prompt": f"x <lora:{name}:1>"}) for name in (
            "nope", "../secret", "out", "/etc/passwd")}
    assert ok.status_code == 200, ok.text
    call = engine.calls[0]
    assert call["prompts"] == ["a red circle , "]
    assert [(e.path.name, e.weight) for e in call["loras"]] == [("ink.safetensors", 0.6),
                                                               ("paper.safetensors", 1.0)]
    assert engine.calls[1]["loras"] is None
    for name, response in bad.items():
        assert response.status_code == 422, name
        assert response.json()["field"] == "prompt"
    assert "valid: ink, paper" in bad["nope"].json()["detail"]
    assert len(engine.calls) == 2


def test_fake_lora_tags_without_a_folder_are_refused():
    with fake_server() as (client, engine):
        response = client.post("/sdapi/v1/txt2img", json={**BODY, "prompt": "x <lora:ink:1>"})
    assert response.status_code == 422 and "--models-dir" in response.json()["detail"]
    assert engine.calls == []


def test_fake_batches_merge_only_equal_models_and_lora_sets(models):
    engines = []
    with fake_server(models_dir=models, engines=engines,
                     limits=Limits(max_wait_ms=300, max_batch=8)) as (client, engine):
        prompts = ["a <lora:ink:1>", "b <lora:ink:1>", "c <lora:paper:1>", "d"]
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda p: client.post("/sdapi/v1/txt2img", json={
                **BODY, "prompt": p}), prompts))
    assert [r.status_code for r in responses] == [200] * 4
    for call in engine.calls:
        assert len({None if call["loras"] is None else tuple(e.path.name for e in call["loras"])
                    for _ in call["prompts"]}) == 1
    merged = [sorted(call["prompts"]) for call in engine.calls]
    assert ["a ", "b "] in merged  # the two equal sets shared a call


def test_fake_model_switch_waits_for_requests_in_flight_and_shows_in_progress(models):
    """Requests queued before a switch finish on the old model; progress counts the load as a
    job while it runs; then the new model serves."""
    engines, loading = [], threading.Event()

    with fake_server(models_dir=models, engines=engines, gate=loading,
                     limits=Limits(max_wait_ms=0, max_batch=1)) as (client, first):
        server = client.app.state.server
        first.hold = threading.Event()
        with ThreadPoolExecutor(3) as pool:
            old = pool.submit(client.post, "/sdapi/v1/txt2img", json={**BODY, "seed": 1})
            assert first.running.wait(5)
            switch = pool.submit(client.post, "/sdapi/v1/options",
                                 json={"sd_model_checkpoint": "alpha"})
            for _ in range(500):
                if server.queued():
                    break
                time.sleep(0.01)
            first.hold.set()
            for _ in range(500):
                if server.loading:
                    break
                time.sleep(0.01)
            during = client.get("/sdapi/v1/progress").json()
            loading.set()
            assert switch.result(10).status_code == 200
            new = client.post("/sdapi/v1/txt2img", json={**BODY, "seed": 2})
    assert pixels(old.result(10).json()["images"][0])[0, 0, 1] == first.tag
    assert during["state"]["job_count"] >= 1 and during["state"]["job"].startswith("Loading")
    assert pixels(new.json()["images"][0])[0, 0, 1] == engines[1].tag != first.tag


def test_fake_a_model_switch_under_four_clients_loses_nothing_and_mixes_no_models(models):
    engines = []
    with fake_server(models_dir=models, engines=engines,
                     limits=Limits(max_wait_ms=20, max_batch=4, max_queue=64)) as (client, _e):
        def client_run(k):
            return [client.post("/sdapi/v1/txt2img", json={
                **BODY, "prompt": f"client {k} request {n}", "seed": 100 * k + n})
                for n in range(6)]

        with ThreadPoolExecutor(5) as pool:
            runs = [pool.submit(client_run, k) for k in range(4)]
            switches = [client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
                        for name in ("alpha", "beta", "fake.safetensors", "alpha")]
            responses = [r for run in runs for r in run.result(30)]
    assert [s.status_code for s in switches] == [200] * 4
    assert [r.status_code for r in responses] == [200] * 24
    tags = {"fake": engines[0].tag, **{Path(e.settings.model_id).stem: e.tag
                                        for e in engines[1:]}}
    for response in responses:
        info = json.loads(response.json()["info"])
        name = Path(info["sd_model_name"]).stem
        assert pixels(response.json()["images"][0])[0, 0, 1] == tags[name]
        assert red(response.json()["images"][0]) == info["all_seeds"][0] % 256
    for engine in engines:  # every engine call drew with its own model only
        assert all(call["model"] == engine.settings.model_id for call in engine.calls)
    assert sum(len(call["prompts"]) for e in engines for call in e.calls) == 24


# --------------------------------------------------------------------------- the batcher alone


def test_batcher_merges_compatible_jobs_in_arrival_order_and_refuses_when_full():
    release, calls = threading.Event(), []

    def generate(jobs):
        calls.append([(job.key, job.prompt) for job in jobs])
        release.wait(5)
        return [[job.prompt] * job.images for job in jobs]

    batcher = Batcher(generate, max_batch=3, max_wait=0.0, max_queue=4)
    first = Job("A", "a0", [0], None)
    batcher.submit([first])
    time.sleep(0.2)  # the worker holds a0; the next jobs queue behind it
    jobs = [Job("B", "b0", [0], None), Job("A", "a1", [0], None), Job("B", "b1", [0], None),
            Job("A", "a2", [0], None)]
    batcher.submit(jobs)
    with pytest.raises(QueueFull):
        batcher.submit([Job("A", "a3", [0], None)])
    release.set()
    assert [job.future.result(5) for job in jobs] == [["b0"], ["a1"], ["b1"], ["a2"]]
    batcher.close()
    # The oldest job leads each batch; compatible ones join it.
    assert calls == [[("A", "a0")], [("B", "b0"), ("B", "b1")], [("A", "a1"), ("A", "a2")]]


def test_a_lone_client_never_waits_for_company_and_concurrent_ones_do():
    calls = []

    def generate(jobs):
        calls.append(len(jobs))
        time.sleep(0.05)
        return [[job.prompt] for job in jobs]

    batcher = Batcher(generate, max_batch=4, max_wait=1.0, max_queue=8)
    started = time.monotonic()
    for k in range(4):  # one client: each request after the last one's answer
        job = Job("A", f"a{k}", [k], None)
        batcher.submit([job])
        job.future.result(5)
    # The first batch waits (company is assumed at the start), the next three do not.
    assert time.monotonic() - started < 1.0 + 3 * 0.05 + 0.5
    jobs = [Job("A", f"b{k}", [k], None) for k in range(3)]
    batcher.submit(jobs[:1])
    time.sleep(0.02)  # b0 runs alone; b1 and b2 arrive while it runs ...
    batcher.submit(jobs[1:])
    [job.future.result(5) for job in jobs]
    jobs = [Job("A", f"c{k}", [k], None) for k in range(2)]
    batcher.submit(jobs[:1])  # ... so the next batch waits for company, and c1 joins it
    time.sleep(0.3)
    batcher.submit(jobs[1:])
    [job.future.result(5) for job in jobs]
    batcher.close()
    assert calls == [1, 1, 1, 1, 1, 2, 2]


def test_interrupt_stops_the_running_batch_only():
    started = threading.Event()

    def generate(jobs):
        started.set()
        for step in range(1, 200):
            batcher.step_done(step, 200)
            time.sleep(0.01)
        return [[job.prompt] for job in jobs]

    batcher = Batcher(generate, max_batch=1, max_wait=0.0, max_queue=4)
    running, waiting = Job("A", "a", [0], None), Job("A", "b", [0], None)
    batcher.submit([running, waiting])
    started.wait(5)
    batcher.interrupt()
    with pytest.raises(Interrupted):
        running.future.result(5)
    assert waiting.future.result(10) == ["b"]
    batcher.close()


# --------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium; "
                    ".ci/run installs it)")
def test_the_gallery_in_a_real_browser(tmp_path):
    """Headless Chromium loads / from a real server on loopback: the DOM lists the image with
    its prompt, and the screenshot shows the picture (the blue background of the prompt)."""
    import socket

    import httpx
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(tiny_settings(*SERVER), Limits(max_wait_ms=0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", timeout=60,
                              json={**BODY, "prompt": "a big red circle on a blue background"})
        assert response.status_code == 200
        browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
        url = f"http://127.0.0.1:{port}/"
        dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True,
                             timeout=60).stdout
        assert "a big red circle on a blue background" in dom and "<img" in dom
        shot = tmp_path / "gallery.png"
        subprocess.run([*browser, f"--screenshot={shot}", "--window-size=800,600", url],
                       capture_output=True, timeout=60)
        picture = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        blue = (picture[..., 2] > 150) & (picture[..., 0] < 100)
        assert blue.sum() > 1000  # the image rendered, not just its caption
    finally:
        server.should_exit = True
        app.state.server.close()
