"""LoRA in plain PyTorch (Hu et al. 2021, arXiv 2106.09685): y = W x + (alpha / r) B A dropout(x).

    add_lora(model, ["q_proj", "v_proj"], r=128, alpha=256)   # the paper's released setting; base weights frozen
    with adapters_disabled(model): ...                          # the base model: DPO's reference, no second copy
    save_adapter(model, path, config); load_adapter(model, path); merged_copy(model).save_pretrained(path)

A is Kaiming-initialised and B zero, so a fresh adapter leaves the model unchanged (the first DPO step has
policy == reference). Adapter files: adapter_model.safetensors (only the A and B matrices, by module name) and
adapter_config.json.
"""

import copy
import json
import math
import os
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale  # (..., out): LoRA, Eq. 3
        return y


def add_lora(model, targets, r, alpha, dropout=0.0):
    """Wrap every nn.Linear whose name ends with one of `targets`; freeze everything else. Returns wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named {targets} in the model")
    return wrapped


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model):
    modules = lora_modules(model).values()
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


def save_adapter(model, path, config):
    tensors = {f"{name}.{k}": getattr(m, k).detach().contiguous().cpu()
               for name, m in lora_modules(model).items() for k in ("lora_A", "lora_B")}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter(model, path):
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    modules = lora_modules(model)
    for key, value in tensors.items():
        name, attr = key.rsplit(".", 1)
        getattr(modules[name], attr).data.copy_(value)


def merged_copy(model):
    """A copy of the model with W <- W + (alpha / r) B A and plain nn.Linear layers again: what transformers loads."""
    merged = copy.deepcopy(model)
    for name, m in lora_modules(merged).items():
        with torch.no_grad():
            m.base.weight += (m.lora_B @ m.lora_A) * m.scale
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name) if parent_name else merged, child, m.base)
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged
