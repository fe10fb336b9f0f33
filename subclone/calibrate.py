"""Calibration: run the parent on real text and measure what each neuron, head and block does.

Statistics use only real tokens: padding and special tokens are selected out
with a boolean mask before anything is summed, so left-, right- and unpadded
batches give the same scores up to floating-point summation order.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from subclone.checkpoint import ParentCheckpoint, TensorReader
from subclone.data import Batch, iter_batches
from subclone.errors import CalibrationError, Cancelled
from subclone.scores import Scores
from subclone.shape import Shape

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_parent_model(
    parent: ParentCheckpoint, *, device: str, dtype: str, max_memory: dict[str, str] | None = None,
    offload_folder: str | None = None,
) -> nn.Module:
    """Load the parent's base model with stock transformers (no remote code, safetensors only).

    With ``max_memory`` the model is dispatched by accelerate: blocks that do not
    fit the budget are kept on the CPU or offloaded to disk and moved to the
    execution device one at a time during the forward pass.
    """
    from transformers import AutoModel

    kwargs: dict[str, Any] = {
        "dtype": DTYPES[dtype],
        "trust_remote_code": False,
        "use_safetensors": True,
    }
    if max_memory:
        budget: dict[int | str, str] = {int(k) if k.isdigit() else k: v for k, v in max_memory.items()}
        kwargs.update(device_map="auto", max_memory=budget, offload_folder=offload_folder or tempfile.mkdtemp(prefix="subclone-offload-"))
    else:
        kwargs["device_map"] = {"": device}
    model = AutoModel.from_pretrained(str(parent.directory), **kwargs)
    model.eval()
    return model


def position_ids_for(mask: torch.Tensor, mode: str, pad_token_id: int | None) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    counted = mask.long().cumsum(-1)
    if mode == "from_mask_after_padding_idx":
        # RoBERTa numbers positions from padding_idx + 1.
        return (counted + int(pad_token_id or 0)) * mask.long() + int(pad_token_id or 0) * (1 - mask.long())
    return (counted - 1).clamp(min=0)


def execution_device(model: nn.Module) -> torch.device:
    """Device that receives the inputs: the first accelerator in an accelerate device map, else the weights' device."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        accelerators = [d for d in device_map.values() if d not in ("cpu", "disk")]
        if not accelerators:
            return torch.device("cpu")
        first = accelerators[0]
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


@dataclass
class _Accumulators:
    hidden: torch.Tensor
    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    relative: torch.Tensor
    angular: torch.Tensor
    tokens: int = 0
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


def _attention_gram(parent: ParentCheckpoint, shape: Shape, layer: int, device: torch.device) -> torch.Tensor:
    """G_h = W_h^T W_h for each head of block ``layer``'s output projection: (H, head_dim, head_dim).

    ||W_h a_h||^2 = a_h^T G_h a_h, so a head's contribution to the residual
    stream is measured without materializing a (tokens, H, hidden) tensor. The
    weight is read from the checkpoint because an offloaded module's weight is
    not resident when hooks run.
    """
    spec = parent.spec
    tensor = spec.tensor(spec.attention_output_weight)
    with TensorReader(parent) as reader:
        weight = reader.get(parent.checkpoint_name(tensor, layer)).float()
    if tensor.axes[0] == "heads":  # Conv1D layout (in_features, out_features)
        weight = weight.t()
    heads, head_dim = shape.num_attention_heads, shape.head_dim
    per_head = weight.reshape(weight.shape[0], heads, head_dim)  # (hidden, H, hd)
    return torch.einsum("ohd,ohe->hde", per_head, per_head).to(device)


def calibrate(
    parent: ParentCheckpoint,
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    shape: Shape,
    *,
    sequence_length: int,
    batch_size: int,
    padding_side: str = "right",
    on_batch: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Scores:
    """Run the parent over ``texts`` and return residual, head, FFN and block scores."""
    spec = parent.spec
    base = getattr(model, "base_model", model)
    layers = base.get_submodule(spec.layers_module)
    assert isinstance(layers, nn.ModuleList), f"{spec.layers_module} is not a ModuleList"
    if len(layers) != shape.num_layers:
        raise CalibrationError(f"the loaded model has {len(layers)} blocks but config.json declares {shape.num_layers}")
    device = execution_device(model)
    grams = [_attention_gram(parent, shape, i, device) for i in range(shape.num_layers)]
    acc = _Accumulators(
        hidden=torch.zeros(shape.hidden_size, dtype=torch.float64),
        heads=[torch.zeros(shape.num_attention_heads, dtype=torch.float64) for _ in range(shape.num_layers)],
        ffn=[torch.zeros(shape.intermediate_size, dtype=torch.float64) for _ in range(shape.num_layers)],
        relative=torch.zeros(shape.num_layers, dtype=torch.float64),
        angular=torch.zeros(shape.num_layers, dtype=torch.float64),
    )
    current: dict[str, torch.Tensor] = {}

    def real(x: torch.Tensor) -> torch.Tensor:
        mask = current["real"].to(x.device)
        return x[mask].float()  # (real tokens, features)

    def add(target: torch.Tensor, values: torch.Tensor) -> None:
        target += values.detach().to("cpu", torch.float64)

    def layer_pre_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            x = real(hidden)
            acc.layer_inputs[index] = x
            if index == 0:
                add(acc.hidden, x.abs().sum(0))
        return hook

    def layer_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            y = real(_first_tensor(output))
            x = acc.layer_inputs.pop(index).to(y.device)
            add(acc.hidden, y.abs().sum(0))
            change = (y - x).norm(dim=-1)
            add(acc.relative[index: index + 1], (change / y.norm(dim=-1).clamp_min(1e-12)).sum().reshape(1))
            cosine = nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1.0, 1.0)
            add(acc.angular[index: index + 1], (torch.arccos(cosine) / math.pi).sum().reshape(1))
        return hook

    def ffn_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            add(acc.ffn[index], real(args[0]).abs().sum(0))
        return hook

    def heads_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = real(args[0])  # (n, H * hd)
            per_head = x.reshape(x.shape[0], shape.num_attention_heads, shape.head_dim)  # (n, H, hd)
            gram = grams[index].to(x.device)
            squared = torch.einsum("nhd,hde,nhe->nh", per_head, gram, per_head).clamp_min(0.0)
            add(acc.heads[index], squared.sqrt().sum(0))
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
            handles.append(base.get_submodule(spec.ffn_output_module.format(layer=i)).register_forward_pre_hook(ffn_hook(i)))
            handles.append(base.get_submodule(spec.attention_output_module.format(layer=i)).register_forward_pre_hook(heads_hook(i)))

        batches = list(iter_batches(tokenizer, texts, sequence_length=sequence_length, batch_size=batch_size, padding_side=padding_side))
        pad_id = parent.config.get("pad_token_id")
        vocab_size = parent.config.get("vocab_size")
        largest = max(int(b.input_ids.max()) for b in batches) if batches else 0
        if isinstance(vocab_size, int) and largest >= vocab_size:
            raise CalibrationError(
                f"the tokenizer produced token id {largest} but the parent's vocab_size is {vocab_size}; "
                "the tokenizer files do not belong to this checkpoint", param="parent",
            )
        for number, batch in enumerate(batches, start=1):
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled during calibration")
            _forward(model, batch, current, spec.position_ids, pad_id, causal=spec.task == "causal_lm", device=device)
            acc.tokens += int(batch.real_tokens.sum())
            if on_batch is not None:
                on_batch(number, len(batches))
    finally:
        for handle in handles:
            handle.remove()

    if acc.tokens == 0:
        raise CalibrationError("calibration text produced no real tokens (only padding and special tokens)", param="calibration")
    n = float(acc.tokens)
    return Scores(
        hidden=acc.hidden / n,
        heads=[h / n for h in acc.heads],
        ffn=[f / n for f in acc.ffn],
        influence={"relative": acc.relative / n, "angular": acc.angular / n},
        metadata={"real_tokens": str(acc.tokens)},
    )


@torch.inference_mode()
def _forward(
    model: nn.Module, batch: Batch, current: dict[str, torch.Tensor], position_mode: str, pad_id: int | None,
    *, causal: bool, device: torch.device,
) -> None:
    current["real"] = batch.real_tokens
    mask = batch.attention_mask
    kwargs: dict[str, Any] = {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": position_ids_for(mask, position_mode, pad_id).to(device),
    }
    if causal:
        kwargs["use_cache"] = False
    model(**kwargs)
