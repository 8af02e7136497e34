"""The activation-lean SwiGLU MLP and RMSNorm equal the model's own layers in output and every gradient, and
save less."""

import pytest
import torch

from ddpo.lean import LeanMLP, LeanRMSNorm, lean_mlp, lean_rms_norm, use_lean
from ddpo.models import load_model


def mlp_ref(x, w_gate, w_up, w_down):
    return (torch.nn.functional.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()


@pytest.mark.parametrize("shape", [(2, 7, 24, 40), (1, 1, 8, 3), (37, 16, 33)])
def test_lean_mlp_output_and_gradients_equal_reference(shape):
    *lead, H, I = shape
    torch.manual_seed(0)
    tensors = [torch.randn(*lead, H, dtype=torch.float64), torch.randn(I, H, dtype=torch.float64),
               torch.randn(I, H, dtype=torch.float64), torch.randn(H, I, dtype=torch.float64)]
    grad_out = torch.randn(*lead, H, dtype=torch.float64)
    results = []
    for f in (mlp_ref, lean_mlp):
        inputs = [t.clone().requires_grad_() for t in tensors]
        out = f(*inputs)
        out.backward(grad_out)
        results.append([out] + [t.grad for t in inputs])
    for name, a, b in zip(["out", "x", "w_gate", "w_up", "w_down"], *results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=name)
    frozen = [t.clone().requires_grad_(i == 0) for i, t in enumerate(tensors)]  # LoRA: weights frozen
    lean_mlp(*frozen).backward(grad_out)
    torch.testing.assert_close(frozen[0].grad, results[0][1], rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lean_mlp, [t.detach()[..., :3, :].clone().requires_grad_() if i == 0 else
                                               t.clone().requires_grad_() for i, t in enumerate(tensors)])


def rms_norm_ref(x, weight, eps):  # LlamaRMSNorm.forward
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("shape", [(2, 7, 24), (1, 1, 3), (37, 16)])
def test_lean_rms_norm_output_and_gradients_equal_reference(shape):
    torch.manual_seed(0)
    tensors = [torch.randn(*shape, dtype=torch.float64) * 3, torch.randn(shape[-1], dtype=torch.float64)]
    grad_out = torch.randn(*shape, dtype=torch.float64)
    results = []
    for f in (rms_norm_ref, lean_rms_norm):
        inputs = [t.clone().requires_grad_() for t in tensors]
        out = f(*inputs, 1e-5)
        out.backward(grad_out)
        results.append([out] + [t.grad for t in inputs])
    for name, a, b in zip(["out", "x", "weight"], *results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)  # x.float() is fp32 in both


def test_lean_rms_norm_bf16_input_fp32_weight():
    torch.manual_seed(0)
    tensors = [torch.randn(4, 9, 16).bfloat16(), torch.randn(16)]
    results = []
    for f in (rms_norm_ref, lean_rms_norm):
        inputs = [t.clone().requires_grad_() for t in tensors]
        out = f(*inputs, 1e-6)
        out.float().square().sum().backward()
        results.append([out] + [t.grad for t in inputs])
    for name, a, b in zip(["out", "x", "weight"], *results):
        assert a.dtype == b.dtype, name
        assert ((b.float() - a.float()).norm() / a.float().norm()).item() < 1e-2, name


def test_lean_mlp_under_bf16_autocast_matches_autocast_reference():
    torch.manual_seed(0)
    tensors = [torch.randn(3, 5, 16), torch.randn(24, 16), torch.randn(24, 16), torch.randn(16, 24)]
    results = []
    for f in (mlp_ref, lean_mlp):
        inputs = [t.clone().requires_grad_() for t in tensors]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = f(*inputs)
        out.float().sum().backward()
        results.append([out] + [t.grad for t in inputs])
    for name, a, b in zip(["out", "x", "w_gate", "w_up", "w_down"], *results):
        assert a.dtype == b.dtype, name  # bf16 output, fp32 gradients, as autocast gives
        assert ((b.float() - a.float()).norm() / a.float().norm()).item() < 1e-2, name  # bf16 rounding only


def test_use_lean_on_a_model_same_logits_and_gradients_less_saved(tiny_model):
    ids = torch.randint(0, 200, (2, 40))
    results, saved = [], []
    for lean in (False, True):
        model = load_model(tiny_model)
        if lean:
            assert use_lean(model) == (model.config.num_hidden_layers, 2 * model.config.num_hidden_layers + 1)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
        saved.append(sum(sizes))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    c = model.config
    mlp = 2 * 2 * 40 * c.intermediate_size * 4 * c.num_hidden_layers  # silu(gate) and the product, (B, T, I) fp32
    norms = 2 * 40 * c.hidden_size * 4 * (2 * c.num_hidden_layers + 1)  # the normalised input, (B, T, H) fp32
    assert saved[0] - saved[1] >= (mlp + norms) * 0.99


def test_use_lean_leaves_other_layers(tiny_model):
    model = load_model(tiny_model)
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()  # not SwiGLU: keeps its forward
    layer = model.model.layers[1].mlp
    layer.forward = lambda x, self=layer: self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))
    norm = type(model.model.norm)
    norm.forward, own = (lambda self, x: (1 + self.weight) * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt(),
                         norm.forward)
    try:  # Gemma-style norms (1 + weight) compute something else: the check refuses the whole class
        assert use_lean(model) == (0, 0)  # the swapped MLP roles differ numerically too
    finally:
        norm.forward = own


def test_lean_model_without_gradients_runs_its_own_layers(tiny_model, monkeypatch):
    """Sampling and evaluation (no_grad) run each layer's own forward, whose weight casts autocast caches, with the
    plain model's logits to the bit; with gradients the lean Functions run."""
    ids = torch.randint(0, 200, (2, 12))
    plain, model = load_model(tiny_model), load_model(tiny_model)
    use_lean(model)
    calls = []
    for function in (LeanMLP, LeanRMSNorm):
        monkeypatch.setattr(function, "apply", lambda *args, f=function.apply: calls.append(1) or f(*args))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert not calls
    model(input_ids=ids)
    assert len(calls) == 3 * model.config.num_hidden_layers + 1  # 2 norms and an MLP per layer, the final norm
