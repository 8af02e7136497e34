"""The activation-lean SwiGLU MLP equals the model's own MLP in output and every gradient, and saves less."""

import pytest
import torch

from ddpo.lean import lean_mlp, use_lean_mlp
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


def test_use_lean_mlp_on_a_model_same_logits_and_gradients_less_saved(tiny_model):
    ids = torch.randint(0, 200, (2, 40))
    results, saved = [], []
    for lean in (False, True):
        model = load_model(tiny_model)
        if lean:
            assert use_lean_mlp(model) == model.config.num_hidden_layers
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
    mlp_saved = 2 * 40 * model.config.intermediate_size * 4 * model.config.num_hidden_layers  # two (T, I) fp32 per layer
    assert saved[0] - saved[1] >= 2 * mlp_saved * 0.99  # silu(gate) and the product are no longer kept


def test_use_lean_mlp_leaves_other_mlps(tiny_model):
    model = load_model(tiny_model)
    for layer in model.model.layers[:1]:
        layer.mlp.act_fn = torch.nn.GELU()  # not SwiGLU: keeps its forward
    layer = model.model.layers[1].mlp
    layer.forward = lambda x, self=layer: self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))
    assert use_lean_mlp(model) == 0  # the swapped roles differ numerically: the check refuses it
