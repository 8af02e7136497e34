"""Activation-lean SwiGLU MLP and RMSNorm: the same arithmetic as Llama-style layers, fewer saved activations.

A Hugging Face MLP computes down(silu(gate(x)) * up(x)) and autograd keeps four (tokens, intermediate) tensors
per layer for the backward: gate(x) for silu, silu(gate(x)) and up(x) for the product, and the product for down's
weight gradient. In fp32 that is 4 x 4 x intermediate bytes per token and layer, the largest share of a decoder's
activations (SmolLM2: 24 KB of the ~47 KB per token and layer). `LeanMLP` keeps only gate(x) and up(x) (the input x
is kept by the layer's norm anyway) and recomputes silu and the product in the backward: two elementwise passes,
no extra matmul. Likewise an RMSNorm keeps its input, its normalised input and its output (the next layer's input);
`LeanRMSNorm` keeps the input and the (tokens, 1) reciprocal RMS and recomputes the normalised input.
`use_lean(model)` switches every MLP (plain bias-free Linear gate_proj / up_proj / down_proj and a SiLU
activation) and every RMSNorm (weight * x / rms(x), as in Llama, Qwen2/3, Mistral, SmolLM2...) after checking once
per class, on a random input, that its own forward computes the same; others (Gemma's 1 + weight, LoRA-wrapped
projections) keep their forward. Under autocast LeanMLP casts as autocast would (inputs and weights to the autocast
dtype) and returns gradients in the inputs' dtypes.
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
    if not torch.is_grad_enabled():  # nothing to save: the layer's own forward, whose weight casts autocast caches
        return type(self).forward(self, x)  # (LeanMLP casts them on every call: each token of sampling)
    return lean_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)  # as LlamaRMSNorm, op for op

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        h = x.float() * rstd  # recomputed
        grad_weight = (grad_out * h.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        grad_h = (grad_out * weight).float()
        grad_x = rstd * (grad_h - h * (grad_h * h).mean(-1, keepdim=True))  # d(x / rms(x)) / dx
        return grad_x.to(x.dtype), grad_weight, None


def lean_rms_norm(x, weight, eps):
    """weight * x / sqrt(mean(x^2) + eps), saving x and the reciprocal RMS only."""
    return LeanRMSNorm.apply(x, weight, eps)


def _lean_norm_forward(self, x):
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    return lean_rms_norm(x, self.weight, self.variance_epsilon)


def _mlp_fits(module):
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(type(p) is torch.nn.Linear and p.bias is None for p in projections)
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


def _norm_fits(module):
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


@torch.enable_grad()  # the lean Functions run only where gradients are wanted
def _same(module, lean_forward, width):
    """The module's own forward and the lean one agree on a random input (its class computes what we assume)."""
    weight = next(module.parameters())
    x = torch.randn(2, 3, width, device=weight.device, dtype=weight.dtype)
    return torch.allclose(module(x).detach(), lean_forward(module, x).detach(), rtol=1e-3, atol=1e-5)


def use_lean(model):
    """Switch every recognised SwiGLU MLP and RMSNorm of `model` to the lean Functions, after checking once per
    class that they compute the same; returns (MLPs, norms) switched. Call it after adapters are added: an MLP whose
    projections are wrapped (LoRA) is not a plain Linear and keeps its own forward."""
    checked, switched = {}, {_lean_forward: 0, _lean_norm_forward: 0}
    for module in model.modules():
        if _mlp_fits(module):
            lean, width = _lean_forward, module.gate_proj.in_features
        elif _norm_fits(module):
            lean, width = _lean_norm_forward, module.weight.shape[0]
        else:
            continue
        if type(module) not in checked:
            checked[type(module)] = _same(module, lean, width)
        if checked[type(module)]:
            module.forward = types.MethodType(lean, module)
            switched[lean] += 1
    return switched[_lean_forward], switched[_lean_norm_forward]
