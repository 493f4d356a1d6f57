"""The layer-by-layer engine: a model skeleton on `meta`, one decoder layer real at a time.

Quantization and evaluation both run every window through decoder layer i
before layer i+1, keeping only the hidden states between layers. The
skeleton is built from the config without allocating weights; a layer gets
its weights (`load_weights`), runs, and gives them back (`free_weights`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lowbit.errors import UsageError
from quantize.arch import LayerNorms


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} asked for, but no CUDA GPU is available")
    return chosen


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_dtype(dtype: str, device: torch.device, model_dtype: str | None) -> torch.dtype:
    """The dtype layers compute in. CPUs are fast and exact in float32; GPUs use the model's half type."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if model_dtype == "float16" else torch.bfloat16


def load_config(folder, trust_remote_code: bool = False) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as e:  # e.g. a model type this transformers does not know, or remote code refused
        raise UsageError(f"cannot read config.json: {str(e).splitlines()[0]}") from None


def build_skeleton(config: PretrainedConfig, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter on `meta` (no memory), and a real rotary embedding."""
    config._attn_implementation = "sdpa"  # causal attention without materialising a mask
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        model.model.rotary_emb = type(rotary)(config=config)  # its inv_freq buffer is computed, not loaded
    model.eval()
    return model


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
    """Give a meta module real weights (names relative to the module); all must be present."""
    state = {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for name, t in tensors.items()}
    missing = set(dict(module.named_parameters())) - set(state)
    if missing:
        raise UsageError(f"checkpoint lacks weights: {', '.join(sorted(missing)[:3])}")
    module.load_state_dict(state, strict=False, assign=True)


def free_weights(module: nn.Module) -> None:
    module.to("meta")


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc keeps them otherwise).

    Called between decoder layers: a layer's many tensors under glibc's 32 MB mmap threshold
    leave free but resident heap behind, and the process would grow a little with every layer.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


class _CaughtInputs(Exception):
    pass


@dataclass
class Activations:
    """Hidden states of every window between two decoder layers, and the layer call's other arguments."""

    hidden: torch.Tensor  # [windows, seqlen, hidden], on `storage` (the device, or host memory when offloaded)
    layer_kwargs: dict  # attention mask, positions, rotary embeddings: the same for every window

    def window(self, i: int, device: torch.device) -> torch.Tensor:
        return self.hidden[i : i + 1].to(device)


def embed_windows(
    model: nn.Module,
    embed_weight: torch.Tensor,
    windows: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    offload: bool = False,
) -> Activations:
    """Run the model up to its first decoder layer for every window and catch that layer's inputs."""
    layers = model.model.layers
    first_layer = layers[0]
    caught: dict = {}

    class Catcher(nn.Module):
        def forward(self, hidden_states, **kwargs):
            caught["hidden"] = hidden_states
            caught["kwargs"] = kwargs
            raise _CaughtInputs

    load_weights(model.model.embed_tokens, {"weight": embed_weight}, device, dtype)
    model.model.rotary_emb.to(device)
    storage = torch.device("cpu") if offload else device
    hidden = torch.empty((*windows.shape, model.config.hidden_size), dtype=dtype, device=storage)
    layers[0] = Catcher()
    try:
        with torch.no_grad():
            for i in range(windows.shape[0]):
                try:
                    model.model(input_ids=windows[i : i + 1].to(device), use_cache=False)
                except _CaughtInputs:
                    hidden[i] = caught["hidden"][0].to(storage)
    finally:
        layers[0] = first_layer
        free_weights(model.model.embed_tokens)
    kwargs = {k: v for k, v in caught["kwargs"].items() if k not in ("cache", "past_key_values", "use_cache")}
    return Activations(hidden=hidden, layer_kwargs=kwargs)


def run_layer(layer: nn.Module, acts: Activations, device: torch.device, update: bool = True) -> None:
    """Run every window through one decoder layer; with update, the outputs replace the inputs."""
    with torch.no_grad():
        for i in range(acts.hidden.shape[0]):
            out = layer(acts.window(i, device), **acts.layer_kwargs)
            if update:
                out = out[0] if isinstance(out, tuple) else out
                acts.hidden[i] = out[0].to(acts.hidden.device)


class StopForward(Exception):
    """Raised by a hook to end a forward early, once the inputs we measure have been seen."""


InputFn = Callable[[int, torch.Tensor], None]  # (window index, the module's input [seqlen, in_features])


def run_layer_until(layer: nn.Module, acts: Activations, device: torch.device, stop_at: nn.Module,
                    on_input: dict[nn.Module, InputFn] | None = None) -> None:
    """Run every window through the layer until `stop_at` is about to run (it and what follows do not);
    on_input[m](i, x) sees module m's input for window i on the way."""
    with _input_hooks(on_input or {}, stop_at) as current:
        with torch.no_grad():
            for i in range(acts.hidden.shape[0]):
                current[0] = i
                try:
                    layer(acts.window(i, device), **acts.layer_kwargs)
                except StopForward:
                    pass


def run_attention_residual(layer: nn.Module, norms: LayerNorms, acts: Activations, o_proj: nn.Module,
                           o_proj_inputs: torch.Tensor, device: torch.device, on_mlp_input: InputFn) -> None:
    """Replace each window's layer input by the residual stream after attention, from o_proj's kept
    inputs (no attention recomputed); on_mlp_input(i, x) sees the MLP's input."""
    after_attention = layer.get_submodule(norms.after_attention) if norms.after_attention else None
    before_mlp = layer.get_submodule(norms.before_mlp)
    with torch.no_grad():
        for i in range(acts.hidden.shape[0]):
            out = o_proj(o_proj_inputs[i : i + 1].to(device))
            if after_attention is not None:
                out = after_attention(out)
            hidden = acts.window(i, device) + out
            acts.hidden[i] = hidden[0].to(acts.hidden.device)
            on_mlp_input(i, before_mlp(hidden)[0])


def run_mlp_residual(layer: nn.Module, norms: LayerNorms, acts: Activations, device: torch.device,
                     stop_at: nn.Module | None = None, on_input: dict[nn.Module, InputFn] | None = None) -> None:
    """The layer's second half, from the residual stream after attention (run_attention_residual).
    Without stop_at, each window's output replaces its input; with it, the MLP stops there."""
    before_mlp = layer.get_submodule(norms.before_mlp)
    after_mlp = layer.get_submodule(norms.after_mlp) if norms.after_mlp else None
    with _input_hooks(on_input or {}, stop_at) as current:
        with torch.no_grad():
            for i in range(acts.hidden.shape[0]):
                current[0] = i
                hidden = acts.window(i, device)
                try:
                    out = layer.mlp(before_mlp(hidden))
                except StopForward:
                    continue
                if after_mlp is not None:
                    out = after_mlp(out)
                acts.hidden[i] = (hidden + out)[0].to(acts.hidden.device)


@contextmanager
def _input_hooks(on_input: dict[nn.Module, InputFn], stop_at: nn.Module | None):
    """Forward pre-hooks calling fn(window, input) and, on stop_at, raising StopForward after them.
    Yields a one-item list the caller sets to the current window index."""
    current = [0]

    def hook_for(fn: InputFn):
        def hook(module, inputs):
            x = inputs[0]
            fn(current[0], x.reshape(-1, x.shape[-1]))

        return hook

    def stop(module, inputs):
        raise StopForward

    handles = [module.register_forward_pre_hook(hook_for(fn)) for module, fn in on_input.items()]
    if stop_at is not None:
        handles.append(stop_at.register_forward_pre_hook(stop))  # after the input hooks: they run first
    try:
        yield current
    finally:
        for handle in handles:
            handle.remove()


def steps_match_layer(layer: nn.Module, norms: LayerNorms, o_proj: nn.Module, acts: Activations,
                      device: torch.device) -> bool:
    """Whether o_proj's input plus run_attention_residual and run_mlp_residual give what the layer's own
    forward gives, on the first window (a transformers release could change a layer's layout)."""
    kept = {}
    with _input_hooks({o_proj: lambda i, x: kept.setdefault("x", x.clone())}, None), torch.no_grad():
        whole = layer(acts.window(0, device), **acts.layer_kwargs)
    whole = whole[0] if isinstance(whole, tuple) else whole
    one = Activations(hidden=acts.window(0, device).clone(), layer_kwargs=acts.layer_kwargs)
    run_attention_residual(layer, norms, one, o_proj, kept["x"][None], device, lambda i, x: None)
    run_mlp_residual(layer, norms, one, device)
    return torch.allclose(one.hidden, whole, rtol=1e-3, atol=1e-5 * float(whole.abs().max()))


def add_input_hook(module: nn.Module, fn: Callable[[torch.Tensor], None]):
    """Call fn with the module's input activations, flattened to [tokens, in_features]."""

    def hook(mod, inputs):
        x = inputs[0]
        fn(x.reshape(-1, x.shape[-1]))

    return module.register_forward_pre_hook(hook)


def live_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters that are materialised (not on meta): what the streaming engine holds."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
