"""Activation-lean SwiGLU MLP: the same arithmetic as Llama-style MLPs, a third of their saved activations.

A Hugging Face MLP computes down(silu(gate(x)) * up(x)) and autograd keeps four (tokens, intermediate) tensors
per layer for the backward: gate(x) for silu, silu(gate(x)) and up(x) for the product, and the product for down's
weight gradient. In fp32 that is 4 x 4 x intermediate bytes per token and layer, the largest share of a decoder's
activations (SmolLM2: 24 KB of the ~47 KB per token and layer). `LeanMLP` keeps only gate(x) and up(x) (the input x
is kept by the layer's norm anyway) and recomputes silu and the product in the backward: two elementwise passes,
no extra matmul. `use_lean_mlp(model)` switches every MLP whose shape it recognises (plain bias-free Linear
gate_proj / up_proj / down_proj and a SiLU activation: Llama, Qwen2/3, Mistral, SmolLM2...) and leaves the others.
Under autocast the Function casts as autocast would (inputs and weights to the autocast dtype) and returns
gradients in the inputs' dtypes.
"""

import types

import torch
import torch.nn.functional as F


def _compute_dtype(x):
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class LeanMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, wg, wu, wd = (t.to(dtype) for t in (x, w_gate, w_up, w_down))
            gate, up = xc @ wg.t(), xc @ wu.t()  # (..., I)
            out = (F.silu(gate) * up) @ wd.t()  # (..., H)
        ctx.save_for_backward(xc, wg, wu, wd, gate, up)
        ctx.dtypes = (x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, wg, wu, wd, gate, up = ctx.saved_tensors
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad  # frozen weights (LoRA) cost no matmul
        grads = [None] * 4
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(gate.dtype)
            sig = torch.sigmoid(gate)
            silu = gate * sig  # recomputed
            grad_prod = g @ wd  # (..., I)
            if need_down:
                grads[3] = g.flatten(0, -2).t() @ (silu * up).flatten(0, -2)  # the product, recomputed
            grad_up = grad_prod * silu
            grad_gate = grad_prod.mul_(up).mul_(sig * (1 + gate * (1 - sig)))  # d silu(z)/dz = s (1 + z (1 - s))
            if need_x:
                grads[0] = grad_gate @ wg + grad_up @ wu
            if need_gate:
                grads[1] = grad_gate.flatten(0, -2).t() @ xc.flatten(0, -2)
            if need_up:
                grads[2] = grad_up.flatten(0, -2).t() @ xc.flatten(0, -2)
        return tuple(None if grad is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes))


def lean_mlp(x, w_gate, w_up, w_down):
    """down(silu(gate(x)) * up(x)) with weights (I, H), (I, H), (H, I), saving only gate(x) and up(x)."""
    return LeanMLP.apply(x, w_gate, w_up, w_down)


def _lean_forward(self, x):
    return lean_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def _fits(module):
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(type(p) is torch.nn.Linear and p.bias is None for p in projections)
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


@torch.no_grad()
def _same(module):
    """The module's own forward and lean_mlp agree on a random input (its class computes what we assume)."""
    x = torch.randn(2, 3, module.gate_proj.in_features, device=module.gate_proj.weight.device,
                    dtype=module.gate_proj.weight.dtype)
    return torch.allclose(module(x), _lean_forward(module, x), rtol=1e-3, atol=1e-5)


def use_lean_mlp(model):
    """Switch every recognised SwiGLU MLP of `model` to lean_mlp, after checking once per class that it computes
    the same; returns how many were switched. Call it after adapters are added: an MLP whose projections are
    wrapped (LoRA) is not a plain Linear and keeps its own forward."""
    checked, switched = {}, 0
    for module in model.modules():
        if _fits(module) and checked.setdefault(type(module), _same(module)):
            module.forward = types.MethodType(_lean_forward, module)
            switched += 1
    return switched
