"""Save Subject / Load Subject: the round trip, the weights check, file names that stay in the folder,
no overwriting, and every unusable file refused by message (tiny weights loaded by Load Nested Attention)."""
import hashlib
import os
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.host import pack_module, setup_comfyui

setup_comfyui(cpu=True)

import folder_paths  # noqa: E402

from training import tiny  # noqa: E402

patch_mod = pack_module("nodes.patch")
subject_mod = pack_module("nodes.subject")
loader_mod = pack_module("nodes.loader")
files_mod = pack_module("nodes.subject_files")
FOLDER = files_mod.FOLDER


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    """A private models dir: weights in models/nested_attention, subjects in models/nested_attention_subjects."""
    models = tmp_path / "models"
    (models / "nested_attention").mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "nested_attention", ([str(models / "nested_attention")], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([], set()))
    unet = tiny.tiny_sdxl(0)
    tiny.save_tiny_weights(models / "nested_attention" / "faces.safetensors", unet, seed=1)
    tiny.save_tiny_weights(models / "nested_attention" / "pets.safetensors", unet, seed=2, bound_word="dog")
    yield models
    for name in ("nested_attention", FOLDER):
        folder_paths.filename_list_cache.pop(name, None)


def load(name):
    return loader_mod.LoadNestedAttention.execute(name).result[0]


def encoded(weights, lam=2.5):
    image = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return subject_mod.EncodeSubject.execute(weights, tiny.tiny_clip_vision(0), image).result[0].with_lambda(lam)


def test_save_then_load_gives_the_same_tokens_and_lambda(folders):
    weights = load("faces.safetensors")
    sha = hashlib.sha256((folders / "nested_attention" / "faces.safetensors").read_bytes()).hexdigest()
    assert weights.source == loader_mod.WeightsFile("faces.safetensors", sha)  # the loader says where the weights came from
    subject = encoded(weights)
    saved = files_mod.SaveSubject.execute(subject, "alice")
    assert saved.result[0] is subject and saved.ui.as_dict() == {"text": ("saved alice.safetensors",)}
    path = folders / FOLDER / "alice.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"tokens"} and torch.equal(f.get_tensor("tokens"), subject.tokens)
        meta = f.metadata()
    assert meta == {"format": "nested-attention-subject", "format_version": "1", "lambda": "2.5", "weights_name": "faces.safetensors",
                    "weights_sha256": sha, "bound_word": "person", "domain": "faces", "base_model": "sdxl"}
    assert "alice.safetensors" in files_mod.LoadSubject.GET_SCHEMA().inputs[1].options  # listed by Load Subject
    loaded = files_mod.LoadSubject.execute(weights, "alice.safetensors").result[0]
    assert torch.equal(loaded.tokens, subject.tokens) and loaded.tokens.shape == (16, 64)  # 2 photos × 8 queries
    assert loaded.lam == subject.lam == 2.5 and loaded.weights is weights
    # λ round-trips exactly, whatever its decimal form
    files_mod.save_subject(subject.with_lambda(1 / 3 + 1), "third")
    assert files_mod.load_subject(weights, "third.safetensors").lam == 1 / 3 + 1


def test_other_weights_are_refused_naming_the_file_needed(folders):
    faces = load("faces.safetensors")
    files_mod.save_subject(encoded(faces), "alice")
    with pytest.raises(ValueError, match=r"alice.safetensors was made with the weights file 'faces.safetensors' \(sha256 [0-9a-f]{12}…\); "
                                         r"the connected weights are 'pets.safetensors'.*load 'faces.safetensors' \(that exact file\)"):
        files_mod.load_subject(load("pets.safetensors"), "alice.safetensors")
    # same name, other bytes (retrained): refused by hash, not by name
    shutil.copy(folders / "nested_attention" / "pets.safetensors", folders / "nested_attention" / "faces.safetensors")
    with pytest.raises(ValueError, match="made with the weights file 'faces.safetensors'.*the connected weights are 'faces.safetensors'"):
        files_mod.load_subject(load("faces.safetensors"), "alice.safetensors")
    # weights not from a file cannot be named or checked
    in_memory = tiny.make_tiny_weights(tiny.tiny_sdxl(0))
    for call in (lambda: files_mod.save_subject(patch_mod.Subject(in_memory, torch.zeros(8, 64)), "x"),
                 lambda: files_mod.load_subject(in_memory, "alice.safetensors")):
        with pytest.raises(ValueError, match="not loaded by Load Nested Attention: load the weights file with Load Nested Attention"):
            call()


@pytest.mark.parametrize("name", ["../escape", "../../models/escape", "/tmp/escape", "sub/escape", "sub\\escape", "..",
                                  "a/../../escape", "C:escape", ".hidden", "", "   ", "x\0y"])
def test_names_that_could_leave_the_folder_are_refused(folders, name):
    subject = encoded(load("faces.safetensors"))
    before = sorted(p for p in folders.parent.rglob("*"))
    with pytest.raises(ValueError, match="is not allowed: use a plain name such as 'alice'"):
        files_mod.save_subject(subject, name)
    with pytest.raises(ValueError, match="is not allowed"):
        files_mod.load_subject(subject.weights, name)
    assert sorted(p for p in folders.parent.rglob("*")) == before  # nothing written anywhere


def test_a_link_out_of_the_folder_is_neither_read_nor_written(folders, tmp_path):
    weights = load("faces.safetensors")
    files_mod.save_subject(encoded(weights), "alice")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folders / FOLDER / "alice.safetensors", outside)
    os.symlink(outside, folders / FOLDER / "linked.safetensors")
    with pytest.raises(ValueError, match=r"resolves to .*outside.safetensors, outside models/nested_attention_subjects"):
        files_mod.load_subject(weights, "linked.safetensors")
    with pytest.raises(ValueError, match="outside models/nested_attention_subjects"):
        files_mod.save_subject(encoded(weights), "linked")
    assert outside.read_bytes() == (folders / FOLDER / "alice.safetensors").read_bytes()


def test_an_existing_name_is_never_overwritten(folders):
    weights = load("faces.safetensors")
    first, second, third = encoded(weights, 1.0), encoded(weights, 2.0), encoded(weights, 3.0)
    assert files_mod.save_subject(first, "alice.safetensors") == "alice.safetensors"
    original = (folders / FOLDER / "alice.safetensors").read_bytes()
    assert files_mod.SaveSubject.execute(second, "alice").ui.as_dict() == {"text": ("saved alice_00001.safetensors",)}
    assert files_mod.save_subject(third, "alice") == "alice_00002.safetensors"
    assert (folders / FOLDER / "alice.safetensors").read_bytes() == original
    assert [files_mod.load_subject(weights, n).lam for n in ("alice.safetensors", "alice_00001.safetensors", "alice_00002.safetensors")] == [1, 2, 3]
    (folders / FOLDER / "bob.safetensors").write_bytes(b"someone else's file")
    assert files_mod.save_subject(first, "bob") == "bob_00001.safetensors"
    assert (folders / FOLDER / "bob.safetensors").read_bytes() == b"someone else's file"


class _Trap:
    def __reduce__(self):
        return (open, ("/tmp/nested_attention_subject_trap_ran", "w"))


def _subject_file(path, tokens, **meta):
    metadata = {"format": "nested-attention-subject", "format_version": "1", "lambda": "1.0",
                "weights_name": "faces.safetensors", "weights_sha256": meta.pop("sha")}
    metadata.update(meta)
    save_file({"tokens": tokens}, str(path), metadata={k: v for k, v in metadata.items() if v is not None})


def test_unusable_files_are_refused_by_message(folders):
    weights = load("faces.safetensors")
    folder = folders / FOLDER
    folder.mkdir()
    sha = weights.source.sha256
    shutil.copy(folders / "nested_attention" / "pets.safetensors", folder / "weights.safetensors")
    save_file({"lora_unet_down.weight": torch.zeros(1)}, str(folder / "lora.safetensors"))
    (folder / "garbage.safetensors").write_bytes(b"\x00" * 40)
    files_mod.save_subject(encoded(weights), "good")
    (folder / "truncated.safetensors").write_bytes((folder / "good.safetensors").read_bytes()[:-100])
    (folder / "pickled.safetensors").write_bytes(pickle.dumps(_Trap()))
    _subject_file(folder / "narrow.safetensors", torch.zeros(8, 32), sha=sha)
    _subject_file(folder / "nan.safetensors", torch.full((8, 64), float("nan")), sha=sha)
    _subject_file(folder / "weak.safetensors", torch.zeros(8, 64), sha=sha, **{"lambda": "0.5"})
    _subject_file(folder / "future.safetensors", torch.zeros(8, 64), sha=sha, format_version="2")
    save_file({"tokens": torch.zeros(8, 64), "extra": torch.zeros(1)}, str(folder / "extra.safetensors"),
              metadata={"format": "nested-attention-subject", "format_version": "1", "weights_sha256": sha})
    cases = {
        "weights.safetensors": "not a subject file.*it is a nested-attention weights file: put it in models/nested_attention and use Load Nested Attention",
        "lora.safetensors": "not a subject file.*subject files are written by Save Subject",
        "garbage.safetensors": "not a readable safetensors file.*corrupt or truncated; save the subject again",
        "truncated.safetensors": "corrupt or truncated",
        "pickled.safetensors": "corrupt or truncated",
        "narrow.safetensors": r"tokens are torch.float32 \[8, 32\], these weights need \[M, 64\].*save the subject again",
        "nan.safetensors": "NaN/inf",
        "weak.safetensors": "its λ is not usable.*λ must be a finite number ≥ 1",
        "future.safetensors": "format version '2', this pack reads 1: update the pack",
        "extra.safetensors": r"holds tensors \['extra', 'tokens'\], a subject file holds only 'tokens'",
        "missing.safetensors": "no subject file 'missing.safetensors' in models/nested_attention_subjects.*save one with Save Subject",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            files_mod.LoadSubject.execute(weights, name)
    assert not os.path.exists("/tmp/nested_attention_subject_trap_ran")  # nothing was unpickled
    assert files_mod.load_subject(weights, "good").tokens.shape == (16, 64)  # ".safetensors" may be left out


def test_the_nodes_schemas(folders):
    save, load_ = files_mod.SaveSubject.GET_SCHEMA(), files_mod.LoadSubject.GET_SCHEMA()
    assert (save.node_id, load_.node_id) == ("NestedAttentionSaveSubject", "NestedAttentionLoadSubject")
    assert save.category == load_.category == "nested_attention" and save.is_output_node
    assert all(i.tooltip for i in save.inputs + load_.inputs)
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    assert paths[0] == os.path.join(str(folders), FOLDER) and extensions == {".safetensors"}
