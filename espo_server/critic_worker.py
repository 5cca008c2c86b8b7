"""Critic checkpoints: what a pushed directory must hold, and the vLLM worker method that loads it.

A critic push must name a directory whose safetensors hold exactly the tensors of the critic being
served (names and shapes; dtypes may differ, vLLM converts), and whose `config.json`, if present,
names the same architecture and number of labels. `checkpoint_problem` says what is wrong, or None.

`CriticWorker` is mixed into vLLM's worker (`worker_extension_cls`), so it runs in the worker
process, next to the model, and is called through `collective_rpc("espo_reload_critic", ...)`. It
reads and checks every tensor *before* it touches the model: a directory that cannot be read leaves
the served critic as it was. Two reasons not to use vLLM's own `reload_weights` RPC as the policy
does: it reloads a checkpoint that does not match without complaint (a mismatched shape killed the
engine core here), and on a classification model with a `score.bias` (HF's
LlamaForTokenClassification has one) it fails: vLLM's adapter sets that bias outside the layer's
weight loader, so the layerwise reload leaves it on the meta device ("Cannot copy out of meta
tensor", vLLM 0.32). So the bias is kept out of vLLM's reload and copied in place afterwards.

No vLLM import at module level: the rollout server imports this module to check a directory.
"""

from __future__ import annotations

import json
from pathlib import Path

TensorSpec = tuple[tuple[int, ...], str]
"""(shape, dtype) of one tensor in a checkpoint."""

_BIAS = "score.bias"


def checkpoint_tensors(directory: str | Path) -> dict[str, TensorSpec]:
    """Name -> (shape, dtype) of every tensor in the directory's safetensors, from their headers."""
    from safetensors import safe_open

    tensors: dict[str, TensorSpec] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                tensors[name] = (tuple(piece.get_shape()), str(piece.get_dtype()))
    return tensors


def _config(directory: Path) -> dict | None:
    path = directory / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_problem(directory: str | Path, reference: str | Path) -> str | None:
    """What keeps `directory` from replacing the critic whose checkpoint is `reference`, or None."""
    directory, reference = Path(directory), Path(reference)
    if not directory.is_dir() or not any(directory.glob("*.safetensors")):
        return f"{directory} is not a directory with *.safetensors files on the critic's machine"
    try:
        config, ref_config = _config(directory), _config(reference)
    except (OSError, ValueError) as exc:
        return f"{directory}/config.json cannot be read: {exc}"
    if config is not None and ref_config is not None:
        for key in ("architectures", "num_labels"):
            have = config.get(key, _labels(config) if key == "num_labels" else None)
            want = ref_config.get(key, _labels(ref_config) if key == "num_labels" else None)
            if have != want:
                return f"{directory}/config.json has {key}={have}; the served critic has {key}={want}"
    try:
        have_tensors = checkpoint_tensors(directory)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        return f"the safetensors in {directory} cannot be read: {exc}"
    return tensors_problem(have_tensors, checkpoint_tensors(reference), str(directory))


def _labels(config: dict) -> int | None:
    labels = config.get("id2label")
    return len(labels) if isinstance(labels, dict) else None


def tensors_problem(have: dict[str, TensorSpec], want: dict[str, TensorSpec], where: str) -> str | None:
    """Missing, unexpected or reshaped tensors, named (the first few of each), or None."""
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    reshaped = [
        f"{name} {list(have[name][0])} (served: {list(want[name][0])})"
        for name in sorted(set(have) & set(want))
        if have[name][0] != want[name][0]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if extra:
        problems.append(f"unexpected tensors {_few(extra)}")
    if reshaped:
        problems.append(f"shapes that do not match {_few(reshaped)}")
    if not problems:
        return None
    return f"{where} does not match the served critic: " + "; ".join(problems)


def _few(items: list[str], k: int = 3) -> str:
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more


class CriticWorker:
    """Methods vLLM mixes into its worker class for the critic engine (`worker_extension_cls`)."""

    def espo_reload_critic(self, weights_path: str, reference_path: str) -> str | None:
        """Load the critic weights in `weights_path` in place. Returns None once loaded, or why
        nothing was changed (the directory cannot be read or does not match `reference_path`).
        Raises only if loading failed after the model was touched."""
        from safetensors import safe_open

        staged: list[tuple[str, object]] = []
        try:
            for file in sorted(Path(weights_path).glob("*.safetensors")):
                with safe_open(str(file), "pt") as f:
                    staged.extend((name, f.get_tensor(name)) for name in f.keys())
            have = {name: (tuple(t.shape), str(t.dtype)) for name, t in staged}  # type: ignore[attr-defined]
            problem = tensors_problem(have, checkpoint_tensors(reference_path), weights_path)
        except Exception as exc:
            return f"the safetensors in {weights_path} cannot be read: {exc}"
        if problem:
            return problem

        runner = self.model_runner  # type: ignore[attr-defined]
        model = runner.get_model()
        bias = dict(staged).get(_BIAS)
        served_bias = getattr(getattr(model, "score", None), "bias", None)
        if bias is not None and served_bias is None:
            return f"{weights_path} has {_BIAS}; the served critic has no bias to load it into"
        runner.reload_weights(
            weights_iterator=((name, t) for name, t in staged if name != _BIAS), is_checkpoint_format=True
        )
        if bias is not None:
            served_bias.data.copy_(bias.to(served_bias.dtype))  # type: ignore[attr-defined]
        return None
