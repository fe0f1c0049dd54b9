"""A Hugging Face index may only name shard files inside the model folder; a cache snapshot whose
files are symlinks into ../../blobs still loads. Bad JSON in config.json or the index names the file."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from _hf_cases import qwen2_moe_like

from moekit.hf import CheckpointError, from_hf, to_hf
from moekit.hf.shards import ShardSet
from moekit.models import build_model

INDEX = "model.safetensors.index.json"


@pytest.fixture
def sharded(tmp_path):
    torch.manual_seed(0)
    model = build_model(qwen2_moe_like())
    return to_hf(model, tmp_path / "hf", max_shard_size="3KB"), model


def _point_one_entry_at(folder, target):
    index = json.loads((folder / INDEX).read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = target
    (folder / INDEX).write_text(json.dumps(index))
    return key


@pytest.mark.parametrize("target", ["../other/model.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                    "..", "C:\\weights\\model.safetensors", ""])
def test_index_entry_leaving_the_folder_is_refused(sharded, tmp_path, target):
    folder, _ = sharded
    # a real, loadable file where the index points: the refusal must not depend on it being bad
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(next(folder.glob("model-*.safetensors")), other / "model.safetensors")
    key = _point_one_entry_at(folder, target)
    with pytest.raises(CheckpointError) as err:
        ShardSet(folder)
    msg = str(err.value)
    assert INDEX in msg and repr(key) in msg and repr(target) in msg and "outside the model folder" in msg
    with pytest.raises(CheckpointError, match="outside the model folder"):
        from_hf(folder)


def test_names_inside_the_folder_are_accepted():
    from moekit.hf.shards import inside_folder

    for name in ("model-00001-of-00002.safetensors", "sub/model.safetensors", "./model.safetensors"):
        assert inside_folder(name), name


def test_cache_snapshot_with_symlinks_into_blobs_loads(sharded, tmp_path):
    """The layout of ~/.cache/huggingface/hub/models--x/: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    folder, model = sharded
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(folder.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / f.name)
    again = from_hf(snap)
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("content", ["[1, 2]", "{garbage", '"a string"'])
def test_bad_config_json_names_the_file(sharded, content):
    folder, _ = sharded
    (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"{folder / 'config.json'} (holds a JSON|is not valid JSON)"):
        from_hf(folder)


@pytest.mark.parametrize("content", ["[1, 2]", "{garbage", '{"weight_map": [1]}', '{"weight_map": {"a": 3}}'])
def test_bad_index_names_the_file(sharded, content):
    folder, _ = sharded
    (folder / INDEX).write_text(content)
    with pytest.raises(CheckpointError, match=rf"{folder / INDEX}"):
        from_hf(folder)
