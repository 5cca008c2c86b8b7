"""The vLLM worker method that reloads the policy in place, tied embeddings included.

`PolicyWorker` is mixed into vLLM's worker (`worker_extension_cls`), so it runs in the worker
process next to the model; the engine calls it through `collective_rpc("espo_reload_policy")`.

Why not vLLM's own `reload_weights` RPC alone: on the CPU backend it leaves a model with tied
embeddings (Qwen2.5 0.5B-3B, Llama-3.2 1B/3B) computing its logits with the *old* weights. vLLM
0.32's layerwise reload (model_executor/model_loader/reload/layerwise.py) re-runs a layer's
`process_weights_after_loading` only when a checkpoint tensor was loaded into that layer. The
output layer of a tied model shares its weight with the input embeddings and is never loaded
itself (the checkpoint has no `lm_head.weight`), so its post-processing is not redone; on CPU that
post-processing is what the logits are computed with: `dispatch_cpu_unquantized_gemm` packs a copy
of the weight for oneDNN (or sgl-kernel) into `layer.cpu_linear`. The shared weight tensor holds
the new values, the packed copy the old ones. So after the reload every layer that shares a
parameter with another layer is post-processed again, from the tensor both now hold (on GPU that
post-processing does nothing for unquantized embeddings, so it costs nothing there).

No vLLM import at module level: the server imports the engine module without starting workers.
"""

from __future__ import annotations

from collections import defaultdict


def refresh_shared_layers(model) -> list[str]:  # model: torch.nn.Module
    """Re-run the weight post-processing of every layer whose parameters another layer shares (the
    tied output layer); returns their names."""
    owners: dict[int, list[tuple[str, object]]] = defaultdict(list)
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners[id(param)].append((name, module))
    refreshed: dict[str, object] = {}
    for modules in owners.values():
        if len(modules) > 1:
            refreshed.update(modules)
    for module in refreshed.values():
        # Unquantized only: a quantized layer's post-processing repacks in place and may not run twice.
        method = getattr(module, "quant_method", None)
        if type(method).__name__.startswith("Unquantized"):
            method.process_weights_after_loading(module)  # type: ignore[union-attr]
    return sorted(refreshed)


class PolicyWorker:
    """Methods vLLM mixes into its worker class for the policy engine (`worker_extension_cls`)."""

    def espo_reload_policy(self, weights_path: str) -> list[str]:
        """Reload the weights in `weights_path` in place (vLLM's layerwise reload), then bring the
        layers that share tensors up to date. Returns the names of those layers."""
        runner = self.model_runner  # type: ignore[attr-defined]
        runner.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        return refresh_shared_layers(runner.get_model())
