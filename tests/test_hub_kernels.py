"""Our kernels and transformers' Hub kernels: kernels/ installs as `ddpo_kernels`, so the PyPI package `kernels`
(required by transformers >= 5.25) is never shadowed from the repo root; every model we run loads with
use_kernels=False, so no layer is swapped for a kernel fetched from the Hub."""

import importlib.metadata
import os
import subprocess
import sys

import pytest
from conftest import make_tiny_encoder, make_tiny_reward_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_repo_root_does_not_shadow_the_pypi_kernels():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed (transformers < 5.25)")
    # `python -c` puts the current directory first on sys.path, as `python -m ddpo.train` does
    code = ("import transformers.integrations.hub_kernels, kernels, ddpo_kernels.logprobs, ddpo.models; "
            "print(kernels.__file__); print(ddpo_kernels.logprobs.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hub, ours = proc.stdout.split()
    assert not os.path.abspath(hub).startswith(ROOT + os.sep), hub
    assert os.path.abspath(ours) == os.path.join(ROOT, "kernels", "logprobs.py")


def test_every_model_loads_without_hub_kernels(tmp_path, monkeypatch, tiny_model):
    from transformers import PreTrainedModel

    from ddpo.embedders import Encoder
    from ddpo.models import load_model
    from ddpo.quality import RewardModel

    if not hasattr(PreTrainedModel, "set_use_kernels"):
        pytest.skip("this transformers has no Hub kernels")
    asked = []
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", lambda self, use, *a, **k: asked.append(use))
    load_model(tiny_model)
    # an encoder (the embedders) and a sequence classifier (the reward model), built from configs
    Encoder(make_tiny_encoder(tmp_path / "encoder", ["a"]), device="cpu")
    RewardModel(make_tiny_reward_model(tmp_path / "reward", tiny_model), device="cpu")
    assert asked == [False] * 3  # the policy, the encoder, the reward model
