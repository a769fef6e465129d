"""serve/models_dir.py: a models folder in A1111's layout, listed in A1111's shapes, names looked
up only inside it (traversal attempts refused before any file is read), `<lora:name:w>` tags."""

import builtins
import hashlib
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from sdaccel.errors import ConfigError
from sdaccel.serve.models_dir import ModelsDir, NameNotFound, lora_tags


@pytest.fixture()
def root(tmp_path):
    """checkpoints/ (two files, a diffusers folder), Lora/ (a safetensors with metadata, a .pt,
    a stranger), embeddings/ (A1111 .pt, A1111 .safetensors, diffusers .bin, a broken .pt)."""
    ckpt = tmp_path / "models" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "alpha.safetensors").write_bytes(b"alpha weights")
    (ckpt / "beta.ckpt").write_bytes(b"beta weights")
    (ckpt / "notes.txt").write_text("not a model")
    (ckpt / "tiny-diffusers").mkdir()
    (ckpt / "tiny-diffusers" / "model_index.json").write_text("{}")
    lora = tmp_path / "models" / "Lora"
    lora.mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora / "ink.safetensors"),
              metadata={"ss_output_name": "inkstyle", "ss_tag_frequency": '{"a": {"ink": 3}}',
                        "note": "{not json"})
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, lora / "old.pt")
    (lora / "readme.md").write_text("x")
    emb = tmp_path / "models" / "embeddings"
    emb.mkdir()
    torch.save({"string_to_param": {"*": torch.ones(2, 8)}, "name": "a1"}, emb / "a1.pt")
    save_file({"emb_params": torch.ones(3, 8)}, str(emb / "civ.safetensors"))
    torch.save({"<tok>": torch.ones(8)}, emb / "learned_embeds.bin")
    (emb / "broken.pt").write_bytes(b"not a pickle")
    return tmp_path / "models"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_checkpoints_listed_with_a1111_titles_and_hashes(root):
    models = ModelsDir(root)
    listed = models.checkpoints()
    assert [c.model_name for c in listed] == ["alpha", "beta", "tiny-diffusers"]
    alpha = listed[0]
    assert alpha.sha256 == sha(b"alpha weights") and alpha.hash == alpha.sha256[:10]
    assert alpha.title == f"alpha.safetensors [{alpha.hash}]"
    assert alpha.filename == str(root.resolve() / "checkpoints" / "alpha.safetensors")
    folder = listed[2]
    assert (folder.title, folder.sha256, folder.hash) == ("tiny-diffusers", None, None)
    assert ModelsDir(root).checkpoints() == listed  # stable across instances (and the cache)


def test_checkpoint_by_each_name_form(root):
    models = ModelsDir(root)
    alpha = models.checkpoint("alpha")
    for name in ("alpha.safetensors", alpha.title, "alpha.safetensors [0000000000]",
                 alpha.hash, alpha.sha256):
        assert models.checkpoint(name) == alpha
    assert models.checkpoint("beta").title.startswith("beta.ckpt [")
    assert models.checkpoint("tiny-diffusers").filename.endswith("tiny-diffusers")


def test_unknown_checkpoint_names_the_valid_titles(root):
    with pytest.raises(NameNotFound) as caught:
        ModelsDir(root).checkpoint("gamma")
    error = caught.value
    assert (error.kind, error.name) == ("checkpoint", "gamma")
    assert error.valid[0].startswith("alpha.safetensors [") and "tiny-diffusers" in error.valid
    assert str(error).startswith("unknown checkpoint 'gamma'; valid: alpha.safetensors [")


def test_a1111_folder_names_and_missing_folders(tmp_path):
    (tmp_path / "Stable-diffusion").mkdir()
    (tmp_path / "Stable-diffusion" / "m.safetensors").write_bytes(b"m")
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "l.pt").write_bytes(b"l")
    models = ModelsDir(tmp_path)
    assert [c.model_name for c in models.checkpoints()] == ["m"]
    assert models.lora("l") == tmp_path.resolve() / "loras" / "l.pt"
    assert models.embeddings() == {"loaded": {}, "skipped": {}}
    empty = ModelsDir(tmp_path / "loras")
    assert empty.checkpoints() == [] and empty.loras() == []
    with pytest.raises(NameNotFound, match="valid: \\(none\\)"):
        empty.lora("x")
    with pytest.raises(ConfigError, match="not a folder"):
        ModelsDir(tmp_path / "nowhere")


def test_loras_listing_and_lookup(root):
    models = ModelsDir(root)
    ink, old = models.loras()
    assert ink["name"] == "ink" and ink["alias"] == "inkstyle"
    assert ink["path"] == str(root.resolve() / "Lora" / "ink.safetensors")
    assert ink["metadata"] == {"ss_output_name": "inkstyle", "ss_tag_frequency": {"a": {"ink": 3}},
                               "note": "{not json"}
    assert old == {"name": "old", "alias": "old", "path": str(root.resolve() / "Lora" / "old.pt"),
                   "metadata": {}}
    path = root.resolve() / "Lora" / "ink.safetensors"
    assert models.lora("ink") == models.lora("ink.safetensors") == models.lora("inkstyle") == path
    with pytest.raises(NameNotFound) as caught:
        models.lora("readme")
    assert caught.value.valid == ["ink", "old"] and "valid: ink, old" in str(caught.value)


def test_embeddings_listing(root):
    listing = ModelsDir(root).embeddings()
    blank = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    assert listing["loaded"] == {"a1": {**blank, "shape": 8, "vectors": 2},
                                 "civ": {**blank, "shape": 8, "vectors": 3},
                                 "<tok>": {**blank, "shape": 8, "vectors": 1}}
    assert listing["skipped"] == {"broken": {**blank, "shape": None, "vectors": None}}
    assert len(ModelsDir(root).embedding_paths()) == 4


@pytest.fixture()
def no_reading(monkeypatch):
    """Any file opened or folder listed from here on fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"read {args[:1]}")
    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(pathlib.Path, "iterdir", refuse)
    monkeypatch.setattr(pathlib.Path, "open", refuse)


BAD_NAMES = ["../x", "/etc/passwd", "a/b", "..\\x", "..", "x..y", "", "  ", "C:\\x", "C:x",
             "checkpoints/alpha.safetensors", "nul\0byte"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_traversal_refused_without_reading(root, no_reading, name):
    models = ModelsDir(root)
    for lookup in (models.checkpoint, models.lora):
        with pytest.raises(NameNotFound, match="refused") as caught:
            lookup(name)
        assert caught.value.name == name and caught.value.valid == []
    with pytest.raises(ValueError):  # "C:x" in a tag: name "C", weight "x" - refused too
        lora_tags(f"a cat <lora:{name}:0.5>", models)


def test_symlink_out_of_the_folder_not_listed_nor_found(root, tmp_path, monkeypatch):
    secret = tmp_path / "secret.safetensors"
    save_file({"x": torch.zeros(1)}, str(secret), metadata={"ss_output_name": "secret"})
    (root / "Lora" / "leak.safetensors").symlink_to(secret)
    (root / "checkpoints" / "leak.ckpt").symlink_to(secret)
    (root / "Lora" / "inside.safetensors").symlink_to(root / "Lora" / "ink.safetensors")
    models = ModelsDir(root)
    assert [x["name"] for x in models.loras()] == ["ink", "inside", "old"]
    assert "leak" not in [c.model_name for c in models.checkpoints()]

    monkeypatch.setattr(builtins, "open", lambda *a, **k: pytest.fail(f"opened {a[:1]}"))
    for name in ("leak", "leak.safetensors"):
        with pytest.raises(NameNotFound, match="link that leads out"):
            models.lora(name)
    for name in ("leak", "leak.ckpt", "leak.ckpt [0123456789]"):
        with pytest.raises(NameNotFound, match="link that leads out"):
            models.checkpoint(name)
    assert models.lora("inside") == root.resolve() / "Lora" / "inside.safetensors"


def test_a_linked_folder_is_the_folder(root, tmp_path):
    elsewhere = tmp_path / "big-disk"
    (root / "Lora").rename(elsewhere)
    (root / "Lora").symlink_to(elsewhere)
    assert ModelsDir(root).lora("ink") == elsewhere.resolve() / "ink.safetensors"


def test_lora_tags(root):
    models = ModelsDir(root)
    ink, old = (root.resolve() / "Lora" / n for n in ("ink.safetensors", "old.pt"))
    text, loras = lora_tags("a cat, <lora:ink:0.6> in snow <LoRA:old>", models)
    assert text == "a cat,  in snow "  # as A1111 leaves it: the tags gone, nothing else touched
    assert [(e.path, e.weight) for e in loras] == [(ink, 0.6), (old, 1.0)]
    _, loras = lora_tags("<lora:ink:0.5:0.2:lbw=x><lora:inkstyle:-0.25>", models)
    assert [(e.path, e.weight) for e in loras] == [(ink, 0.25)]  # te weight; one name adds up
    _, loras = lora_tags("<lora:old:unet=0.3:te=0.7>", models)
    assert loras[0].weight == 0.7
    assert lora_tags("no tags (at: all) <hypernet:x:1>", None) == \
        ("no tags (at: all) <hypernet:x:1>", [])


def test_lora_tags_bad(root):
    models = ModelsDir(root)
    with pytest.raises(NameNotFound, match="unknown lora 'nope'; valid: ink, old"):
        lora_tags("x <lora:nope:1>", models)
    with pytest.raises(ValueError, match="weight 'heavy' is not a number"):
        lora_tags("x <lora:ink:heavy>", models)
    with pytest.raises(ValueError, match="not a number"):
        lora_tags("x <lora:ink:nan>", models)
    with pytest.raises(NameNotFound, match="--models-dir") as caught:
        lora_tags("x <lora:ink:1>", None)
    assert caught.value.kind == "lora" and caught.value.name == "ink"


def test_metadata_of_a_huge_or_broken_header_is_empty(tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "huge.safetensors").write_bytes((1 << 40).to_bytes(8, "little"))
    (tmp_path / "loras" / "junk.safetensors").write_bytes(b"\x05" + b"\0" * 7 + b"{oops")
    header = json.dumps({"__metadata__": ["a list"]}).encode()
    (tmp_path / "loras" / "odd.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header)
    assert [x["metadata"] for x in ModelsDir(tmp_path).loras()] == [{}, {}, {}]
