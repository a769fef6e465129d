"""The shapes data set, its tokenizer, judge, training smoke run and the bundled model."""

from __future__ import annotations

import numpy as np
import pytest

from sdaccel.shapes import BUNDLED_DIR, dataset, judge


def test_dataset_is_deterministic():
    a = [(np.asarray(img), text) for img, text, _ in dataset.examples(20, seed=3)]
    b = [(np.asarray(img), text) for img, text, _ in dataset.examples(20, seed=3)]
    c = [text for _, text, _ in dataset.examples(20, seed=4)]
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b, strict=True))
    assert [t for _, t in a] != c
    assert a[0][0].shape == (dataset.IMAGE_SIZE, dataset.IMAGE_SIZE, 3)


def test_grammar_covers_the_issue_examples():
    for text in (
        "a red circle on a blue background",
        "a small yellow triangle in the top left",
        "two green squares",
        "a big white star on a red and blue background",
    ):
        assert dataset.caption(_scene_of(text)) == text


def _scene_of(text: str) -> dataset.Scene:
    p = dataset.parse_caption(text)
    return dataset.Scene(
        str(p["colour"]),
        str(p["shape"]),
        tuple(p.get("background", ("white",))),  # type: ignore[arg-type]
        count=int(p["count"]),
        size=str(p.get("size", "medium")),
        position=p.get("position"),  # type: ignore[arg-type]
        state_size="size" in p,
        state_background="background" in p,
    )


def test_held_out_captions_never_in_training():
    held = dataset.held_out_captions()
    assert len(held) == 3 * len(dataset.HELD_OUT_TRIPLES)
    train = list(dataset.examples(3000))
    assert not set(held) & {text for _, text, _ in train}
    assert not any(scene.is_held_out() for _, _, scene in train)
    assert all(scene.is_held_out() for _, _, scene in dataset.examples(50, held_out=True))
    for text in held:
        parsed = dataset.parse_caption(text)
        assert (
            parsed["colour"],
            parsed["shape"],
            parsed["background"][0],
        ) in dataset.HELD_OUT_TRIPLES


def test_parse_caption_rejects_other_text():
    for bad in (
        "a red",
        "a pink circle",
        "three red circles",
        "a red circle on a blue",
        "two small red circles",
    ):
        with pytest.raises(ValueError):
            dataset.parse_caption(bad)


def test_tokenizer_round_trips_every_caption(tmp_path):
    from transformers import CLIPTokenizer

    from sdaccel.training.tokenizer import MODEL_MAX_LENGTH, check_round_trip, save_tokenizer

    save_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert tok.model_max_length == MODEL_MAX_LENGTH
    assert check_round_trip(tok) == len(set(dataset.all_caption_forms())) > 10_000
    ids = tok("background green", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2  # no merge clash between the two words


def test_judge_reads_real_images_near_perfectly():
    items = list(dataset.examples(200, seed=11)) + list(
        dataset.examples(50, seed=11, held_out=True)
    )
    acc = judge.accuracy([img for img, _, _ in items], [text for _, text, _ in items])
    assert acc["aligned"] >= 0.98, acc
    for attr in ("colour", "shape", "count"):
        assert acc[attr] >= 0.99, acc


def test_judge_rejects_mismatched_captions():
    items = list(dataset.examples(60, seed=12))
    checked = 0
    for (img, _, scene), (_, other, other_scene) in zip(items, items[1:] + items[:1], strict=True):
        if (scene.colour, scene.shape, scene.count) != (
            other_scene.colour,
            other_scene.shape,
            other_scene.count,
        ):
            assert not judge.score(img, other).aligned, (scene, other)
            checked += 1
    assert checked > 40
    img, text, scene = dataset.example(0)
    wrong_colour = next(
        c for c in dataset.COLOURS if c != scene.colour and c not in scene.background
    )
    assert not judge.score(img, text.replace(scene.colour, wrong_colour, 1)).aligned
    blank = np.zeros((dataset.IMAGE_SIZE, dataset.IMAGE_SIZE, 3), dtype=np.uint8)
    assert judge.read(blank).shape is None and not judge.score(blank, "a red circle").aligned


def test_caption_labels_name_every_stated_attribute():
    from sdaccel.training import train

    labels = train.caption_labels(
        ["a small red circle in the top left on a blue and white background", "two green stars"]
    ).tolist()
    colour, position = dataset.COLOURS.index, dataset.POSITIONS.index
    assert labels[0] == [0, colour("red"), 0, 1, position("top left") + 1, 3, 6]
    assert labels[1] == [1, colour("green"), dataset.SHAPES.index("star"), 0, 0, 0, 0]


@pytest.mark.slow
def test_smoke_training_runs_end_to_end_and_learns(tmp_path):
    """The --smoke run with a text-encoder stage long enough to learn something (40 steps of 8
    captions instead of 2): every stage runs, saves and reloads, and the text encoder reads the
    colour and shape back from held-out captions it never saw far above chance (1/6 and 1/4;
    measured over seeds 0-2: colour 0.72-0.81, shape 0.64-0.69; 2 steps: 0.14-0.19, 0.22-0.33)."""
    import dataclasses

    from sdaccel.training import train

    cfg = dataclasses.replace(train.parse_args(["--smoke", "--out", str(tmp_path / "m")]),
                              text_steps=40)
    report = train.run(cfg)
    assert report["check_image_size"] == [dataset.IMAGE_SIZE, dataset.IMAGE_SIZE]
    read_back = report["text_encoder"]["held_out_attributes_read_back"]
    assert read_back["colour"] >= 0.5 and read_back["shape"] >= 0.45, read_back
    # the VAE's ceiling (judge on its reconstructions) is reported with every run; that it
    # measures the ceiling: test_vae_check_measures_what_the_vae_can_draw
    ceiling = report["vae"]["held_out_judge_on_reconstructions"]
    assert ceiling["n"] == 108 and {"aligned", "colour", "shape", "count"} <= set(ceiling)
    assert (tmp_path / "m" / "model_index.json").exists()
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_vae_check_measures_what_the_vae_can_draw():
    """A VAE that gives its input back scores the judge's own accuracy (>= 0.98, as on real
    images); one that draws nothing scores 0: the ceiling is read from the reconstructions."""
    import math
    from types import SimpleNamespace

    import torch

    from sdaccel.training import train

    class Perfect:
        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z):
            return SimpleNamespace(sample=z)

    class Blank(Perfect):
        def decode(self, z):
            return SimpleNamespace(sample=torch.zeros_like(z))  # flat grey

    perfect, blank = train.vae_check(Perfect()), train.vae_check(Blank())
    assert perfect["held_out_judge_on_reconstructions"]["aligned"] >= 0.98, perfect
    assert math.isinf(perfect["held_out_psnr_db"])
    assert blank["held_out_judge_on_reconstructions"]["aligned"] == 0.0, blank
    assert blank["held_out_psnr_db"] < 15


@pytest.mark.skipif(
    not (BUNDLED_DIR / "model_index.json").exists(), reason="bundled model not trained"
)
def test_bundled_model_loads_offline_and_generates():
    import torch
    from diffusers import StableDiffusionPipeline

    size = sum(f.stat().st_size for f in BUNDLED_DIR.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    assert not list(BUNDLED_DIR.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(str(BUNDLED_DIR), use_safetensors=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red circle on a blue background",
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images[0].size == (dataset.IMAGE_SIZE, dataset.IMAGE_SIZE)
    half = StableDiffusionPipeline.from_pretrained(str(BUNDLED_DIR), torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16


@pytest.mark.skipif(
    not (BUNDLED_DIR / "model_index.json").exists(), reason="bundled model not trained"
)
def test_bundled_text_encoder_tells_every_stated_word_apart():
    """Position words once collapsed in a jointly trained text encoder, and the UNet never learnt
    them: swapping "top left" for "bottom right" must move the token states at least half as much
    as swapping a colour does."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdaccel.training.train import tokenize

    tokenizer = CLIPTokenizer.from_pretrained(str(BUNDLED_DIR / "tokenizer"))
    encoder = CLIPTextModel.from_pretrained(str(BUNDLED_DIR / "text_encoder"))
    base = "a small red circle in the top left on a blue background"
    edits = [base.replace("top left", "bottom right"), base.replace("red", "green")]
    with torch.no_grad():
        states = encoder(tokenize(tokenizer, [base, *edits]))[0]
    moved_by_position, moved_by_colour = ((states[0] - states[k]).norm() for k in (1, 2))
    assert moved_by_position > 0.5 * moved_by_colour, (moved_by_position, moved_by_colour)


@pytest.mark.skipif(
    not (BUNDLED_DIR / "model_index.json").exists(), reason="bundled model not trained"
)
def test_bundled_model_draws_what_the_caption_says():
    """What a new user sees: the `tiny` preset (the demo) draws trained captions recognisably."""
    from sdaccel.engine.engine import Engine
    from sdaccel.settings import resolve_settings

    captions = [
        f"a {colour} {shape} on a {bg} background"
        for colour, shape, bg in [
            ("red", "circle", "blue"),  # the demo prompt
            ("green", "square", "white"),
            ("yellow", "triangle", "purple"),
            ("blue", "star", "yellow"),
            ("white", "circle", "red"),
            ("purple", "triangle", "green"),
            ("red", "square", "yellow"),
            ("green", "star", "blue"),
        ]
    ]
    placed = [
        ("yellow", "triangle", "top left", "blue"),
        ("red", "square", "top right", "white"),
        ("green", "circle", "bottom left", "red"),
        ("white", "star", "bottom right", "purple"),
    ]
    corners = [f"a small {c} {s} in the {where} on a {bg} background" for c, s, where, bg in placed]
    assert not set(captions + corners) & set(dataset.held_out_captions())
    settings = resolve_settings("tiny", environ={}).settings
    results = Engine(settings).generate(captions + corners, seed=settings.seed)
    scores = [judge.score(r.image, c) for r, c in zip(results, captions + corners, strict=True)]
    assert scores[0].aligned, scores[0]
    assert sum(s.aligned for s in scores[:8]) >= 6, [s.reading for s in scores[:8]]
    # the position words are followed: "in the top left" lands in the top left
    readings = [s.reading for s in scores[8:]]
    followed = [r.position == where for r, (_, _, where, _) in zip(readings, placed, strict=True)]
    assert sum(followed) >= 3, readings


def test_the_bundled_vocabulary_file_is_the_grammars_words_and_the_components_carry_it():
    """bundled/shapes/vocabulary.txt is data the runtime reads (Components.vocabulary); the
    data set module generates it (training/train.py writes it), and the two must agree."""
    from sdaccel.engine.loading.models import VOCABULARY_FILE, load_components, read_vocabulary

    assert (BUNDLED_DIR / VOCABULARY_FILE).read_text() == "\n".join(dataset.vocabulary()) + "\n"
    assert read_vocabulary(BUNDLED_DIR) == tuple(dataset.vocabulary())
    assert load_components("bundled:shapes").vocabulary == tuple(dataset.vocabulary())
    assert load_components("random:tiny").vocabulary is None  # any text


def test_unknown_words_are_the_words_outside_a_vocabulary():
    from sdaccel.engine.text.vocabulary import unknown_words

    words = dataset.vocabulary()
    assert unknown_words("A Black circle, on a red background; black!", words) == ["black"]
    assert unknown_words("two big red squares in the top left", words) == []
    assert unknown_words("it's a ring", ["a"]) == ["it's", "ring"]


def test_words_the_bundled_model_never_saw_are_named_once():
    from sdaccel.engine.engine import Engine
    from sdaccel.events import Warning
    from sdaccel.settings import resolve_settings

    seen = []
    settings = resolve_settings("tiny", overrides=["sampler.steps=1"], environ={}).settings
    engine = Engine(settings, on_event=seen.append)
    engine.generate(["a black circle"], negative_prompt="blurry")
    engine.generate(["a black square"])  # already said
    engine.check_prompts(["a pink square", "a black ring"])  # a run's prompts, checked ahead
    warnings = [e.message for e in seen if isinstance(e, Warning)]
    assert len(warnings) == 2
    assert "never saw the word(s) 'black', 'blurry'" in warnings[0]
    assert "It knows: a, and, background" in warnings[0]
    # New words are named; the vocabulary, said once, is not listed again.
    assert "never saw the word(s) 'pink', 'ring'" in warnings[1]
    assert "It knows" not in warnings[1]
