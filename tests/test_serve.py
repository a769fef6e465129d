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
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import tiny_settings
from PIL import Image

from sdaccel.errors import ConfigError
from sdaccel.serve.app import Limits, create_app
from sdaccel.serve.batcher import Batcher, Interrupted, Job, QueueFull

# The bundled model at 4 steps: real pictures in well under a second each.
SERVER = ("model_id=bundled:shapes", "generation.height=64", "generation.width=64",
          "sampler.steps=4")
BODY = {"prompt": "a red circle on a blue background", "seed": 11, "steps": 4, "width": 64,
        "height": 64, "cfg_scale": 4.0, "sampler_name": "DPM++ 2M"}


@pytest.fixture(scope="module")
def server():
    app = create_app(tiny_settings(*SERVER), Limits(max_batch=4, max_wait_ms=400, max_queue=8,
                                                    max_pixels=128 * 128))
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
    ({"enable_hr": True}, "enable_hr", "hires fix"),
    ({"restore_faces": True}, "restore_faces", "face restoration"),
    ({"styles": ["cinematic"]}, "styles", "styles"),
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
    """The Engine methods the server uses. Image k is flat, its red channel seed % 256, so a test
    reads the seed that made it; `hold` (an Event) pauses every step until it is set."""

    def __init__(self, settings, on_event):
        self.settings, self.on_event = settings, on_event
        self.components = SimpleNamespace(name="fake.safetensors", model_hash="0123abcd")
        self.device = "cpu"
        self.prompts = SimpleNamespace(chunk_count=lambda prompt, negative: 1 + len(prompt) // 100)
        self.calls: list[dict] = []
        self.hold: threading.Event | None = None
        self.running = threading.Event()

    def check_size(self, height, width):
        for key, value in (("generation.height", height), ("generation.width", width)):
            if value % 16:
                raise ConfigError(f"{key}: {value} is not a multiple of 16", key=key)

    def generate(self, prompts, negative_prompt="", seed=None, generation=None, sampler=None,
                 loras=None):
        from sdaccel.engine.engine import ImageResult
        from sdaccel.events import StepDone

        generation = generation or self.settings.generation
        sampler = sampler or self.settings.sampler
        self.calls.append({"prompts": list(prompts), "seeds": list(seed), "sampler": sampler,
                           "generation": generation})
        self.running.set()
        for step in range(1, sampler.steps + 1):
            self.on_event(StepDone(step, sampler.steps, len(prompts)))
            if self.hold is not None:
                self.hold.wait(5)
        size = (generation.width, generation.height)
        steps = sampler.steps
        return [ImageResult(prompt=p, negative_prompt=negative_prompt, seed=k, steps=steps,
                            nfe=2 * steps, cost=float(steps), decisions="F" * steps,
                            image=Image.new("RGB", size, (k % 256, 0, 0)), latents=None,
                            seconds=0.0, generation=generation)
                for p, k in zip(prompts, seed, strict=True)]


@contextmanager
def fake_server(*overrides, limits=None, api_key=None):
    """A TestClient on an app over a FakeEngine; yields (client, engine)."""
    engines = []

    def start(settings, on_event):
        engines.append(FakeEngine(settings, on_event))
        return engines[-1], []

    app = create_app(tiny_settings(*FAKE_SETTINGS, *overrides), limits or Limits(max_wait_ms=0),
                     api_key, start_engine=start)
    with TestClient(app) as client:
        yield client, engines[0]
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
        assert huge.status_code == 413 and "limit 1000" in huge.json()["detail"]
        for open_path in ("/v1/health", "/v1/metrics", "/"):
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
