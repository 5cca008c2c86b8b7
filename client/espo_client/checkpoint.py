"""A model's weights as safetensors shards, made in memory from tensors as they come, for an upload.

    for shard in shards(model):                      # a torch module: its state_dict()
    for shard in shards(model.state_dict()):         # a mapping name -> tensor
    for shard in shards(named_tensors_iterator):     # (name, tensor) pairs: verl's, TRL's or
        ...                                          # slime's weight hooks hand these over

Tensors are taken one at a time into a shard of about `shard_bytes` (a tensor larger than that is
a shard of its own) and the shard is cut as soon as it is full, so a lazy iterator (one that
gathers each parameter from its ranks) is read as the upload goes, and at most two shards'
tensors are referenced at a time (the one being sent and the next). A shard is a safetensors file
described, not built: its header is computed from the tensors' shapes and dtypes, and its bytes
are the tensors' own memory, read in place (`Shard.chunks`), so nothing is copied for CPU tensors
in a contiguous layout (others are copied one at a time: `.cpu().contiguous()`) and nothing is
written to disk. Its SHA-256 is computed over the same bytes before it is sent, on a worker thread
while the shard before it is being sent.

Tensors that alias one another (the tied input and output embeddings of Qwen2.5 or Llama-3.2,
whose `state_dict()` holds the one tensor under two names) are sent once, under the first name:
the checkpoint `save_pretrained` writes has that name only. Needs torch (the `torch` extra).
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_SHARD_BYTES", "Shard", "named_tensors", "shards"]

logger = logging.getLogger("espo_client")

DEFAULT_SHARD_BYTES = 512 << 20
"""About how many bytes of tensors one shard holds (one request of an upload)."""
CHUNK_BYTES = 4 << 20
"""The pieces a shard's bytes are handed to the transport in."""

_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}  # fmt: skip
"""torch dtype name -> safetensors dtype."""


@dataclass(frozen=True)
class Shard:
    """One safetensors file: `header` (its length prefix and JSON) then each tensor's bytes."""

    name: str
    header: bytes
    tensors: tuple[tuple[str, Any], ...]
    """(name, tensor) in file order; CPU, contiguous."""
    size: int
    """Bytes of the whole file."""
    sha256: bytes

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]:
        """The file's bytes, in pieces of at most `chunk_bytes`, read from the tensors in place."""
        yield self.header
        for _, tensor in self.tensors:
            data = _bytes_of(tensor)
            for start in range(0, len(data), chunk_bytes):
                yield data[start : start + chunk_bytes]


def named_tensors(weights: Any) -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs of a torch module (its `state_dict()`), a mapping, or an iterable of
    pairs, with aliases of a tensor already given left out (tied embeddings)."""
    if hasattr(weights, "state_dict") and callable(weights.state_dict):
        pairs: Iterable[tuple[str, Any]] = weights.state_dict().items()
    elif isinstance(weights, Mapping):
        pairs = weights.items()
    else:
        pairs = weights
    # Memory is told apart by address while the tensor that had it lives (weakly held: a lazy
    # iterator's tensors are freed as the upload goes, and their addresses reused).
    seen: dict[tuple, tuple[str, Any]] = {}
    for name, tensor in pairs:
        key = _alias_key(tensor)
        first = seen.get(key)
        if first is not None and first[1]() is not None:
            logger.debug("%s shares its memory with %s: sent once, as %s", name, first[0], first[0])
            continue
        seen[key] = (name, _weak(tensor))
        yield name, tensor


def shards(weights: Any, *, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Iterator[Shard]:
    """The safetensors shards of `weights` (see `named_tensors`), made as they are iterated,
    named model-00001.safetensors, model-00002.safetensors, ..."""
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    # The next shard is hashed on a worker thread while the caller sends this one (hashlib lets
    # go of the GIL); its tensors are still gathered here, in the caller's thread.
    with ThreadPoolExecutor(1, thread_name_prefix="espo-shard-hash") as hashing:
        pending: Future[Shard] | None = None
        for count, batch in enumerate(_batches(weights, shard_bytes), start=1):
            hashed = hashing.submit(_shard, f"model-{count:05d}.safetensors", batch)
            if pending is not None:
                yield pending.result()
            pending = hashed
        if pending is not None:
            yield pending.result()


def _batches(weights: Any, shard_bytes: int) -> Iterator[list[tuple[str, Any]]]:
    """The (name, CPU tensor) pairs of `weights`, cut into lists of about `shard_bytes`."""
    batch: list[tuple[str, Any]] = []
    size = 0
    for name, tensor in named_tensors(weights):
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        tensor = _on_cpu(name, tensor)
        nbytes = tensor.numel() * tensor.element_size()
        if batch and size + nbytes > shard_bytes:
            yield batch
            batch, size = [], 0
        batch.append((name, tensor))
        size += nbytes
    if batch:
        yield batch


def _shard(name: str, tensors: list[tuple[str, Any]]) -> Shard:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor_name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        entries[tensor_name] = {
            "dtype": _dtype(tensor_name, tensor),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    header = len(text).to_bytes(8, "little") + text
    hasher = hashlib.sha256(header)
    for _, tensor in tensors:
        hasher.update(_bytes_of(tensor))
    return Shard(name, header, tuple(tensors), len(header) + offset, hasher.digest())


def _on_cpu(name: str, tensor: Any) -> Any:
    if not hasattr(tensor, "detach") or not hasattr(tensor, "element_size"):
        raise TypeError(f"{name}: a torch.Tensor is needed, got {type(tensor).__name__}")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.contiguous()


def _dtype(name: str, tensor: Any) -> str:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise TypeError(f"{name}: dtype {dtype} has no safetensors form")
    return _DTYPES[dtype]


def _bytes_of(tensor: Any) -> memoryview:
    """The tensor's memory as bytes, in place (a CPU tensor in a contiguous layout)."""
    import torch

    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _alias_key(tensor: Any) -> tuple:
    if tensor.numel() == 0:  # empty tensors share no memory worth saving, whatever their pointers say
        return (id(tensor),)
    try:
        return (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            str(tensor.dtype),
            str(tensor.device),
        )
    except (AttributeError, RuntimeError):  # not a plain tensor: never an alias
        return (id(tensor),)


def _weak(tensor: Any) -> Any:
    try:
        return weakref.ref(tensor)
    except TypeError:  # not weakly referable: compared while this upload runs
        return lambda: tensor
