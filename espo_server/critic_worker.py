"""Critic checkpoints: what a pushed directory must hold, and the vLLM worker method that loads it.

A critic push must name a directory whose safetensors hold exactly the tensors of the critic being
served, and whose `config.json`, if present, names the same architecture and number of labels: the
checks of every push (`weights.checkpoint_problem`). `checkpoint_problem` says what is wrong, or None.

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

from pathlib import Path

from .errors import InvalidRequest
from .weights import checkpoint_problem as problem_of

_BIAS = "score.bias"


def checkpoint_problem(directory: str | Path, reference: str | Path) -> str | None:
    """What keeps `directory` from replacing the critic whose checkpoint is `reference`, or None."""
    directory = Path(directory)
    if not directory.is_dir() or not any(directory.glob("*.safetensors")):
        return f"{directory} is not a directory with *.safetensors files on the critic's machine"
    try:
        problem = problem_of(directory, str(reference))
    except InvalidRequest as exc:
        return f"the safetensors in {directory} cannot be read: {exc.message}"
    return f"{directory} does not match the served critic: {problem}" if problem else None


class CriticWorker:
    """Methods vLLM mixes into its worker class for the critic engine (`worker_extension_cls`)."""

    def espo_reload_critic(self, weights_path: str, reference_path: str) -> str | None:
        """Load the critic weights in `weights_path` in place. Returns None once loaded, or why
        nothing was changed (the directory cannot be read or does not match `reference_path`).
        Raises only if loading failed after the model was touched."""
        from safetensors import safe_open

        problem = checkpoint_problem(weights_path, reference_path)
        if problem:
            return problem
        staged: list[tuple[str, object]] = []
        try:
            for file in sorted(Path(weights_path).glob("*.safetensors")):
                with safe_open(str(file), "pt") as f:
                    staged.extend((name, f.get_tensor(name)) for name in f.keys())
        except Exception as exc:
            return f"the safetensors in {weights_path} cannot be read: {exc}"

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
