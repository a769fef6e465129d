"""CLIP ViT-L/14's tokenizer built offline from open_clip's merges file: the hub tokenizer's ids,
built once into the cache, a clear line when open-clip-torch is missing."""

import gzip
import html
import importlib.util

import pytest
import regex

from sdaccel.engine.loading import clip_tokenizer as ct
from sdaccel.errors import ModelNotFoundError


class OpenAIStyleTokenizer:
    """OpenAI CLIP's SimpleTokenizer (simple_tokenizer.py), re-implemented here from its
    published algorithm and fed the same gz: the reference the transformers tokenizer is held
    to (ftfy's text fixing is left out: a no-op on the prompts below)."""

    def __init__(self, bpe_path):
        bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
              *range(ord("®"), ord("ÿ") + 1)]
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs), strict=True))
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token):
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def __call__(self, text):
        text = " ".join(html.unescape(html.unescape(text)).split()).lower()
        ids = [self.encoder["<|startoftext|>"]]
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[piece] for piece in self.bpe(token)]
        return [*ids, self.encoder["<|endoftext|>"]]


def test_a_photo_of_a_cat_has_the_published_ids():
    tokenizer = ct.clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        49406, 49407, 49407)
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {49407}


@pytest.mark.parametrize("prompt", [
    "a 🐱 astronaut riding a 🐴 on the moon 🌙✨",
    "don't stop: sun-glasses, U.S.A.!!! (masterpiece:1.2) [blurry] 1024x768",
    "Photorealistic PORTRAIT of an elderly fisherman, 85mm f/1.8, bokeh",
    "naïve café façade, Zürich — 東京 タワー",
])
def test_ids_match_openai_clip_tokenization(prompt):
    reference = OpenAIStyleTokenizer(ct.bpe_merges_file())
    assert ct.clip_tokenizer()(prompt).input_ids == reference(prompt)


def test_built_once_into_the_cache(monkeypatch):
    from sdaccel.cache_dir import cache_root

    folder = ct.tokenizer_dir()
    assert folder == cache_root() / "tokenizers" / "clip-vit-large-patch14"
    assert {p.name for p in folder.iterdir()} == {"vocab.json", "merges.txt",
                                                  "tokenizer_config.json"}
    monkeypatch.setattr(ct, "vocab_and_merges", lambda *_: pytest.fail("built twice"))
    assert ct.clip_tokenizer()("a cat").input_ids == [49406, 320, 2368, 49407]


def test_a_cache_that_cannot_be_written_builds_it_aside(monkeypatch):
    """A full disk (or a read-only cache) under the cache root: the tokenizer still loads, from
    a temporary folder, and no half-built folder is left in the cache."""
    import errno

    from sdaccel.cache_dir import cache_root

    def disk_full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ct.os, "replace", disk_full)
    folder = ct.tokenizer_dir()
    assert not folder.is_relative_to(cache_root())
    assert (folder / "tokenizer_config.json").is_file()
    assert list((cache_root() / "tokenizers").iterdir()) == []


def test_without_open_clip_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError) as info:
        ct.clip_tokenizer()
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith("which is not installed: pip install --no-deps "
                            "open-clip-torch==3.3.0")


def test_random_sd15_and_folders_without_a_tokenizer_use_it(tmp_path):
    """random:sd15 (SD 1.5's configs shipped here, no tokenizer/ among them) and a user's folder
    without tokenizer/ read prompts with CLIP's tokenizer; a folder with one keeps its own."""
    from sdaccel.engine.loading.models import arch_dir, bundled_dir, load_tokenizer

    assert not (arch_dir("sd15") / "tokenizer").exists()
    assert load_tokenizer(arch_dir("sd15"))("a photo of a cat").input_ids[:3] == [49406, 320, 1125]
    assert len(load_tokenizer(tmp_path)) == 49408
    assert len(load_tokenizer(bundled_dir("shapes"))) < 1000  # the bundled model's own
