"""The layer-by-layer engine: a model skeleton on `meta`, one decoder layer real at a time.

Quantization and evaluation both run every window through decoder layer i
before layer i+1, keeping only the hidden states between layers. The
skeleton is built from the config without allocating weights; a layer gets
its weights (`load_weights`), runs, and gives them back (`free_weights`).
True-sequential's passes through parts of a layer are quantize/steps.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lowbit.errors import UsageError
from lowbit.quantize.arch import Architecture


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
    """The language model with every parameter on `meta` (no memory), and its computed buffers real.

    A multimodal config gives its text model alone (a `*ForCausalLM` built from `text_config`).
    """
    config = config.get_text_config()
    config._attn_implementation = "sdpa"  # causal attention without materialising a mask
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        model.model.rotary_emb = type(rotary)(config=config)  # its inv_freq buffer is computed, not loaded
    compute_buffers(model)
    model.eval()
    return model


def compute_buffers(model: nn.Module) -> None:
    """Make the non-persistent buffers still on meta real, with the values the model's own init gives them.

    They are computed, never loaded: Gemma 3's embedding scale sqrt(hidden), say. Left on meta, the
    forward would run on meta. They are kept in float32 (the skeleton is built in the config's dtype,
    which would round sqrt(640) to 25.25 in bfloat16); the forward casts them to its compute dtype.
    """
    owners = {}
    for name, buffer in model.named_buffers():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if buffer.device.type == "meta" and attr in module._non_persistent_buffers_set:
            dtype = torch.float32 if buffer.is_floating_point() else buffer.dtype
            module.register_buffer(attr, torch.empty_like(buffer, device="cpu", dtype=dtype), persistent=False)
            owners[module_name] = module
    for module in owners.values():
        model._init_weights(module)


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
    """Give a meta module real weights (names relative to the module); all must be present."""
    state = {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for name, t in tensors.items()}
    missing = set(dict(module.named_parameters())) - set(state)
    if missing:
        raise UsageError(f"checkpoint lacks weights: {', '.join(sorted(missing)[:3])}")
    module.load_state_dict(state, strict=False, assign=True)


@contextmanager
def matmul_precision(fast: bool) -> Iterator[None]:
    """float32 matmuls at torch's "medium" precision (fast) or "highest", the caller's setting restored after.

    "medium" means bfloat16 operands with float32 sums where oneDNN has such a path (CPUs with AMX or
    AVX512-BF16), TF32 on a GPU, and the same bits elsewhere. The window passes and the Hessian sums run
    fast: 3-5x quicker products on an AMX CPU, a change below calibration noise (BENCHMARKS.md,
    "fast-matmul"). The solver runs exact: a Cholesky inverse does not forgive rounded operands.
    Also a decorator: `@matmul_precision(fast=False)`.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium" if fast else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def free_weights(module: nn.Module) -> None:
    """Give the module's parameters back (to meta); its computed buffers stay real."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            sub.register_parameter(name, nn.Parameter(param.to("meta"), requires_grad=param.requires_grad))


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


def each_layer(model: nn.Module, arch: Architecture, read_prefix: Callable[[str], dict[str, torch.Tensor]],
               device: torch.device, dtype: torch.dtype, start: int = 0,
               report: Callable[[str, int, int], None] | None = None, stage: str = "layers",
               prefetch: Callable[[str], None] | None = None):
    """The one layer loop of quantize and eval: yields (index, layer, its tensors as read) for every decoder
    layer from START, with only that layer's weights materialised; once the caller is done with it, the
    weights go back to meta and the freed heap to the system, and REPORT hears (stage, done, total).
    PREFETCH(prefix), when given, hears of the next layer as soon as this one is read."""
    report = report or (lambda stage_, done, total: None)
    report(stage, start, arch.num_layers)
    for i in range(start, arch.num_layers):
        layer = model.model.layers[i]
        tensors = read_prefix(arch.layer_prefix(i))
        if prefetch is not None and i + 1 < arch.num_layers:
            prefetch(arch.layer_prefix(i + 1))
        load_weights(layer, tensors, device, dtype)
        yield i, layer, tensors
        free_weights(layer)
        del tensors
        release_free_heap()
        report(stage, i + 1, arch.num_layers)


class _CaughtInputs(Exception):
    pass


@dataclass
class Activations:
    """Hidden states of every window entering decoder layer `depth`, and every layer's other call arguments.

    The arguments (attention mask, positions, rotary embeddings) are the same for every window but may
    differ between layers: Gemma 3 gives its sliding-window layers their own mask and rotary base.
    """

    hidden: torch.Tensor  # [windows, seqlen, hidden], on `storage` (the device, or host memory when offloaded)
    kwargs_by_layer: list[dict]  # what the model's own forward passes decoder layer i
    depth: int = 0  # the layer these hidden states enter; run_layer(update=True) moves it on
    _buffer: torch.Tensor | None = field(default=None, repr=False)  # input_buffer's room

    @property
    def layer_kwargs(self) -> dict:
        return self.kwargs_by_layer[self.depth]

    def input_buffer(self, features: int) -> torch.Tensor:
        """Room for a module's input [seqlen, features] of every window, in host memory: as large as the
        activations or more, it would otherwise set the GPU's peak (Phi-4's o_proj inputs: 2.5 GiB).

        The room is the last call's, grown when too small: its user is done with one before it asks for
        the next. Fresh memory costs a page fault per 4 KiB on first touch, about 0.4 ms a MiB on a 2-core
        CPU (a tenth of a second a layer for SmolLM2's kept inputs at 64 x 512), so it is paid once a run."""
        windows, seqlen = self.hidden.shape[:2]
        size = windows * seqlen * features
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = None  # the old room goes before the new one is made
            self._buffer = torch.empty(size, dtype=self.hidden.dtype, device="cpu")
        return self._buffer[:size].view(windows, seqlen, features)

    def release_buffer(self) -> None:
        """Give input_buffer's room back (until the next call)."""
        self._buffer = None

    def window(self, i: int, device: torch.device) -> torch.Tensor:
        return self.hidden[i : i + 1].to(device)

    def check_layer(self, layer: nn.Module) -> None:
        """Refuse to run a layer on the arguments of another (they may be another attention type's)."""
        index = getattr(layer, "layer_idx", self.depth)
        if index != self.depth:
            raise RuntimeError(f"decoder layer {index} run on activations entering layer {self.depth}")


def embed_windows(
    model: nn.Module,
    embed_weight: torch.Tensor,
    windows: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    offload: bool = False,
) -> Activations:
    """Embed every window, and catch what the model's forward passes each decoder layer.

    The first window goes through stand-ins for all the layers (each passes its input on), so each
    layer's own arguments are caught from the model itself; later windows stop at the first layer.
    """
    layers = model.model.layers
    originals = list(layers)
    caught: dict = {"kwargs": []}

    class Catcher(nn.Module):
        def __init__(self, index: int):
            super().__init__()
            self.index = index

        def forward(self, hidden_states, **kwargs):
            if self.index == 0:
                caught["hidden"] = hidden_states
                if caught["kwargs"]:
                    raise _CaughtInputs
            caught["kwargs"].append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")})
            if self.index == len(originals) - 1:
                raise _CaughtInputs
            return hidden_states

    embed_tokens, skeleton_weight = model.model.embed_tokens, model.model.embed_tokens.weight
    used, id_to_row = rows_of_tokens(windows, embed_weight.shape[0])
    # only the rows the windows use, in the compute dtype (Gemma 3's whole table in float32: 672 MB, 1.4 s)
    embed_tokens.weight = nn.Parameter(embed_weight[used].to(device=device, dtype=dtype), requires_grad=False)
    id_to_row = id_to_row.to(device)
    to_rows = embed_tokens.register_forward_pre_hook(lambda module, args: (id_to_row[args[0]], *args[1:]))
    model.model.rotary_emb.to(device)
    storage = torch.device("cpu") if offload else device
    hidden = torch.empty((*windows.shape, model.config.hidden_size), dtype=dtype, device=storage)
    for i in range(len(originals)):
        layers[i] = Catcher(i)
    try:
        with torch.no_grad():
            for i in range(windows.shape[0]):
                try:
                    model.model(input_ids=windows[i : i + 1].to(device), use_cache=False)
                except _CaughtInputs:
                    hidden[i] = caught["hidden"][0].to(storage)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        to_rows.remove()
        embed_tokens.weight = skeleton_weight
    kwargs_by_layer = [without_plain_causal_mask(kwargs, layer) for kwargs, layer in zip(caught["kwargs"], originals)]
    return Activations(hidden=hidden, kwargs_by_layer=kwargs_by_layer)


def rows_of_tokens(windows: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids the windows hold, sorted, and a map [vocab_size] from each of them to its position there:
    an embedding of those rows alone, looked up through the map, gives what the whole table gives."""
    used = torch.unique(windows)
    outside = used[(used < 0) | (used >= vocab_size)]
    if outside.numel():
        raise UsageError(f"window token id {int(outside[0])} is outside the model's {vocab_size}-token embedding")
    id_to_row = torch.zeros(vocab_size, dtype=torch.int64)
    id_to_row[used] = torch.arange(used.numel())
    return used, id_to_row


def without_plain_causal_mask(kwargs: dict, layer: nn.Module) -> dict:
    """The layer's arguments with its attention mask dropped where that mask is exactly causal.

    Gemma 3's sliding-window layers get a materialised mask even when the window covers every position
    (windows of 512 tokens, a sliding window of 512), and a mask keeps SDPA off its causal path. Without
    one, transformers asks SDPA for is_causal (and grouped KV heads without repeating them): the same
    outputs bit for bit, a sliding layer 11-13 % faster on the CPU. Layers whose attention is not causal
    keep their mask.
    """
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 2:
        return kwargs
    if not all(getattr(m, "is_causal", False) for m in layer.modules() if hasattr(m, "is_causal")):
        return kwargs
    queries, keys = mask.shape[-2:]
    if queries != keys or any(size != 1 for size in mask.shape[:-2]):
        return kwargs
    causal = torch.ones(queries, keys, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(mask.reshape(queries, keys), causal):
        return kwargs
    return {**kwargs, "attention_mask": None}


def run_layer(layer: nn.Module, acts: Activations, device: torch.device, update: bool = True) -> None:
    """Run every window through one decoder layer; with update, the outputs replace the inputs."""
    acts.check_layer(layer)
    with torch.no_grad():
        for i in range(acts.hidden.shape[0]):
            out = layer(acts.window(i, device), **acts.layer_kwargs)
            if update:
                out = out[0] if isinstance(out, tuple) else out
                acts.hidden[i] = out[0].to(acts.hidden.device)
    if update:
        acts.depth += 1


def add_input_hook(module: nn.Module, fn: Callable[[torch.Tensor], None]):
    """Call fn with the module's input activations, flattened to [tokens, in_features]."""

    def hook(mod, inputs):
        x = inputs[0]
        fn(x.reshape(-1, x.shape[-1]))

    return module.register_forward_pre_hook(hook)


def live_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters that are materialised (not on meta): what the streaming engine holds."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
