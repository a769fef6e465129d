"""Weighted prompts in AUTOMATIC1111's syntax, BREAK and long prompts as chained chunks
(engine/text/prompts.py); a plain prompt is encoded exactly as before (and as diffusers)."""

import pytest
import torch
from helpers import tiny_settings

from sdaccel.engine.engine import Engine
from sdaccel.engine.text.prompts import apply_weights, parse_prompt_attention, plain_text
from sdaccel.events import Warning
from sdaccel.settings import resolve_settings


@pytest.fixture(scope="module")
def tiny():
    """random:tiny: CLIP's 77-token window; its tokenizer spells most words letter by letter
    ('a' is one token)."""
    return Engine(tiny_settings())


@pytest.fixture(scope="module")
def shapes():
    """The bundled model: a trained text encoder (16-token window, 14 per chunk)."""
    return Engine(resolve_settings("tiny", overrides=["sampler.steps=4"], environ={}).settings)


def diffusers_embeddings(engine, texts):
    """What the engine computed before weighted prompts, and what StableDiffusionPipeline's
    encode_prompt computes: the tokenizer's padded, truncated ids through the text encoder."""
    ids = engine.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                           max_length=engine.tokenizer.model_max_length).input_ids
    with torch.no_grad():
        return engine.text_encoder(ids)[0].to(engine.unet_dtype)


# ---------------------------------------------------------------------------- parsing

# The examples of A1111's modules/prompt_parser.py parse_prompt_attention docstring, and BREAK.
@pytest.mark.parametrize(("text", "expected"), [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("a (red:1.3) circle", [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("(unmatched) close)", [("unmatched", 1.1), (" close)", 1.0)]),
    ("ratio: 16:9", [("ratio: 16:9", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_prompt_attention(text, expected):
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


def test_plain_text_drops_the_syntax():
    assert plain_text("a (red:1.3) [circle] BREAK on \\(blue\\)") == "a red circle on (blue)"


# ---------------------------------------------------------------------------- plain prompts

PLAIN = ["a red circle on a blue background", "two green squares", "", "photo: a cat, 16:9"]


@pytest.mark.parametrize("weighting", [True, False])
def test_plain_prompts_are_encoded_exactly_as_before(tiny, weighting):
    engine = tiny if weighting else Engine(tiny_settings("prompt.weighting=false"))
    assert engine.prompts.weighting is weighting
    assert torch.equal(engine.prompts.encode(PLAIN), diffusers_embeddings(engine, PLAIN))
    guided = engine.encode_prompts(PLAIN[:2], "blurry", engine.settings.generation.model_copy(
        update={"num_images_per_prompt": 2, "guidance_scale": 7.5}))
    expected = torch.cat([diffusers_embeddings(engine, ["blurry"] * 2),
                          diffusers_embeddings(engine, PLAIN[:2])]).repeat_interleave(2, dim=0)
    assert torch.equal(guided, expected)


def test_weighting_is_on_by_default():
    assert tiny_settings().prompt.weighting is True


# ---------------------------------------------------------------------------- weights


def test_a_weight_scales_its_tokens_and_the_mean_is_restored(shapes):
    """'a (red:1.5) circle' has the token ids of 'a red circle'; its embedding is that one with
    the hidden state at red's position times 1.5, then all of it rescaled to the old mean."""
    plain = shapes.prompts.encode(["a red circle"])[0]
    weighted = shapes.prompts.encode(["a (red:1.5) circle"])[0]
    weights = torch.ones(plain.shape[0])
    weights[2] = 1.5  # BOS, a, red
    unrestored = apply_weights(plain, weights, restore_mean=False)
    changed = (unrestored != plain).any(dim=-1).nonzero().flatten().tolist()
    assert changed == [2]
    scale = plain.mean() / unrestored.mean()
    assert scale != 1.0
    assert torch.allclose(weighted, unrestored * scale, atol=1e-6)
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)


def test_bracket_weights_are_the_numbers_they_stand_for(shapes):
    def same(a, b):
        return torch.allclose(shapes.prompts.encode([a]), shapes.prompts.encode([b]), atol=1e-6)

    assert same("a (red) circle", "a (red:1.1) circle")
    assert same("a ((red)) circle", "a (red:1.21) circle")
    assert same("a [red] circle", f"a (red:{1 / 1.1}) circle")
    assert not same("a (red) circle", "a red circle")
    assert torch.equal(shapes.prompts.encode(["a (red:1) circle"]),
                       shapes.prompts.encode(["a red circle"]))


def test_escaped_brackets_are_text(tiny):
    # '\(' is the character '(' itself, with weight 1: the text the tokenizer reads.
    assert torch.equal(tiny.prompts.encode(["a \\(red\\) circle"]),
                       diffusers_embeddings(tiny, ["a (red) circle"]))


# ---------------------------------------------------------------------------- chunks


def test_a_150_token_prompt_is_two_chunks_and_the_negative_prompt_is_padded():
    events = []
    engine = Engine(tiny_settings(), on_event=events.append)  # the prompt encoder's Warnings
    prompt = " ".join(["a"] * 150)  # 150 tokens: two chunks of 75
    chunks = engine.prompts.chunks(prompt)
    embeddings = engine.encode_prompts([prompt], "blurry", engine.settings.generation.model_copy(
        update={"guidance_scale": 7.5}))
    assert not events  # nothing is cut: nothing to say
    tokenizer = engine.tokenizer
    assert [c.ids.count(tokenizer.convert_tokens_to_ids("a</w>")) for c in chunks] == [75] * 2
    assert all(c.ids[0] == tokenizer.bos_token_id and c.ids[76] == tokenizer.eos_token_id
               for c in chunks)
    assert embeddings.shape == (2, 154, 32)
    uncond, cond = embeddings
    chunk = diffusers_embeddings(engine, [" ".join(["a"] * 75)])[0]
    assert torch.equal(cond[:77], chunk) and torch.equal(cond[77:], chunk)
    # The negative prompt: its own chunk, then the empty prompt's.
    assert torch.equal(uncond[:77], diffusers_embeddings(engine, ["blurry"])[0])
    assert torch.equal(uncond[77:], diffusers_embeddings(engine, [""])[0])


def test_prompts_of_one_batch_are_padded_to_the_longest(tiny):
    long = " ".join(["a"] * 100)
    embeddings = tiny.prompts.encode(["a red circle", long])
    assert embeddings.shape == (2, 154, 32)
    assert torch.equal(embeddings[0, :77], diffusers_embeddings(tiny, ["a red circle"])[0])
    assert torch.equal(embeddings[0, 77:], diffusers_embeddings(tiny, [""])[0])


def test_chunk_count_says_which_prompts_batch_alone(tiny):
    long = " ".join(["a"] * 100)
    assert tiny.prompts.chunk_count("a red circle") == 1
    assert tiny.prompts.chunk_count("a red circle", long) == 2
    assert tiny.prompts.chunk_count(long + " BREAK b") == 3


def test_break_starts_a_new_chunk(tiny):
    embeddings = tiny.prompts.encode(["a red circle BREAK a blue square"])[0]
    assert embeddings.shape == (154, 32)
    assert torch.equal(embeddings[:77], diffusers_embeddings(tiny, ["a red circle"])[0])
    assert torch.equal(embeddings[77:], diffusers_embeddings(tiny, ["a blue square"])[0])


def test_a_full_chunk_breaks_after_its_last_comma(tiny):
    """A1111's comma backtrack: when a chunk fills up and a comma is among its last 20 tokens,
    what follows the comma moves to the next chunk."""
    a, b = (tiny.tokenizer.convert_tokens_to_ids(t) for t in ("a</w>", "b</w>"))
    comma = tiny.tokenizer.convert_tokens_to_ids(",</w>")
    chunks = tiny.prompts.chunks(" ".join(["a"] * 70) + ", " + " ".join(["b"] * 10))
    assert chunks[0].ids[1:73] == [a] * 70 + [comma, tiny.tokenizer.eos_token_id]
    assert chunks[1].ids[1:12] == [b] * 10 + [tiny.tokenizer.eos_token_id]


def test_weighting_off_cuts_long_prompts_and_says_how_much():
    events = []
    engine = Engine(tiny_settings("prompt.weighting=false"), on_event=events.append)
    embeddings = engine.prompts.encode([" ".join(["a"] * 80)])
    assert embeddings.shape == (1, 77, 32)
    assert len(events) == 1 and isinstance(events[0], Warning)
    assert "80 tokens" in events[0].message and "last 5 token(s) are cut" in events[0].message


@pytest.mark.parametrize("adaptive", [
    [],
    ["adaptive.enabled=true", "adaptive.mode=per_step", "adaptive.warmup_steps=1",
     "adaptive.cache.interval=2"],  # feature caching: the layered UNet with a longer context
])
def test_a_long_prompt_generates(adaptive):
    engine = Engine(tiny_settings(*adaptive))
    long = "a red circle on a blue background, " * 8
    results = engine.generate([long, "a red circle"], negative_prompt="blurry", seed=3)
    assert len(results) == 2 and all(torch.isfinite(r.latents).all() for r in results)


def test_unknown_words_ignore_the_syntax():
    events = []
    engine = Engine(resolve_settings("tiny", overrides=["sampler.steps=1"], environ={}).settings,
                    on_event=events.append)
    engine.generate(["a (red:1.3) [circle] BREAK on a blue background"])
    assert not [e for e in events if isinstance(e, Warning)]
