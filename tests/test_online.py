"""ddpo.online on the tiny model: a round replays through ddpo.train, resume equals an uninterrupted run, the
round's weights equal ddpo.prepare's, plain online DPO, and bad flags before any model loads."""

import os

import pytest
import torch
from conftest import make_tiny_encoder, make_tiny_reward_model, read_jsonl, write_jsonl
from safetensors.torch import load_file

from ddpo.online import main, online, parse_args
from ddpo.train import parse_args as train_args
from ddpo.train import train

PROMPTS = ["Write a story about a lighthouse.", "Write a poem about rain.", "Describe a dragon.",
           "A letter to the moon.", "Write about a clock."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """Prompts, a tiny reward model (scores that differ) and a tiny semantic encoder: no packaged model needed."""
    d = tmp_path_factory.mktemp("online")
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    reward = make_tiny_reward_model(d / "reward", tiny_model)
    encoder = make_tiny_encoder(d / "encoder", ["a", "e", "the"])
    return prompts, reward, encoder


def run(tmp_path, tiny_model, setup, *extra, name="online"):
    prompts, reward, encoder = setup
    out = str(tmp_path / name)
    cfg = parse_args(["--model", tiny_model, "--prompts", prompts, "--output-dir", out, "--score",
                      f"reward-model:{reward}", "--semantic-embedder", encoder, "--prompts-per-round", "3",
                      "--n", "4", "--max-new-tokens", "12", "--lr", "1e-3", "--dtype", "float32", *extra])
    return cfg, online(cfg)


def rows(path):
    return read_jsonl(os.path.join(path, "metrics.jsonl"))


def weights(checkpoint):
    return load_file(os.path.join(checkpoint, "model.safetensors"))


def test_a_round_replayed_through_train_takes_the_same_update(tmp_path, tiny_model, setup):
    """Round 1's pairs file, trained by ddpo.train from the same start model, gives the round's loss and weights."""
    cfg, path = run(tmp_path, tiny_model, setup, "--rounds", "1", "--deviation", "style")
    pairs = os.path.join(cfg.output_dir, "rounds", "round-1.jsonl")
    (row,) = rows(cfg.output_dir)
    assert row["pairs"] == len(read_jsonl(pairs)) > 0 and row["weights/max"] > 1.0  # weights that move
    replay = train_args(["--model", tiny_model, "--data", pairs, "--output-dir", str(tmp_path / "replay"),
                         "--loss", "ddpo", "--max-steps", "1", "--lr", "1e-3", "--dtype", "float32",
                         "--batch-size", "2", "--grad-accum", str(-(-row["pairs"] // 2)),  # the round: one step
                         "--max-length", "0", "--max-prompt-length", "0"])
    replayed = train(replay)
    (again,) = rows(replay.output_dir)
    for key in ("loss", "grad_norm", "weights/mean", "rewards/margins"):
        assert row[key] == pytest.approx(again[key], rel=1e-5, abs=1e-6), key
    a, b = weights(path), weights(replayed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)  # Adam: ~sign(g) x lr


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_model, setup):
    """Two rounds at once, or one round, stop, and --resume to two: the same rows, pools and weights."""
    whole, whole_path = run(tmp_path, tiny_model, setup, "--rounds", "2", name="whole")
    part, _ = run(tmp_path, tiny_model, setup, "--rounds", "1", name="part")
    part, part_path = run(tmp_path, tiny_model, setup, "--rounds", "2", "--resume", name="part")
    drop = ("step_time_s", "tokens_per_s", "sample_s", "score_embed_s", "train_s", "sample_tokens_per_s", "peak_mem_gb")
    for a, b in zip(rows(whole.output_dir), rows(part.output_dir), strict=True):
        kept = {k: v for k, v in b.items() if k not in drop}
        assert {k: v for k, v in a.items() if k not in drop} == pytest.approx(kept)
    for r in (1, 2):
        name = os.path.join("rounds", f"round-{r}.pools.jsonl")
        assert read_jsonl(os.path.join(whole.output_dir, name)) == read_jsonl(os.path.join(part.output_dir, name))
    a, b = weights(whole_path), weights(part_path)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_round_weights_equal_prepare_on_the_same_pairs(tmp_path, tiny_model, setup):
    import ddpo.prepare as prep

    cfg, _ = run(tmp_path, tiny_model, setup, "--rounds", "1", "--deviation", "both")
    pairs = os.path.join(cfg.output_dir, "rounds", "round-1.jsonl")
    out = str(tmp_path / "prepared.jsonl")
    prep.prepare(prep.parse_args(["--input", pairs, "--output", out, "--deviation", "both",
                                  "--semantic-embedder", setup[2]]))
    ours, theirs = read_jsonl(pairs), read_jsonl(out)
    assert [(r["chosen"], r["rejected"]) for r in ours] == [(r["chosen"], r["rejected"]) for r in theirs]
    assert [r["weight"] for r in ours] == pytest.approx([r["weight"] for r in theirs], rel=1e-5, abs=1e-6)


def test_deviation_none_and_dpo_is_plain_online_dpo(tmp_path, tiny_model, setup):
    cfg, _ = run(tmp_path, tiny_model, setup, "--rounds", "2", "--loss", "dpo", "--deviation", "none",
                 "--pairing", "best-worst", "--steps-per-round", "2")
    got = rows(cfg.output_dir)
    assert [r["step"] for r in got] == [1, 2]
    assert all(r["weights/min"] == r["weights/max"] == 1.0 and r["pairs"] <= 3 for r in got)  # best-worst: one a prompt
    for r in got:
        assert 0 <= r["pool_semantic_diversity"] <= 2 and r["pool_quality_max"] >= r["pool_quality_mean"]
    pools = read_jsonl(os.path.join(cfg.output_dir, "rounds", "round-2.pools.jsonl"))
    assert len(pools) == 3 * 4 and {p["prompt"] for p in pools} <= set(PROMPTS)


@pytest.mark.parametrize("flags, error", [
    (["--n", "1"], "argument --n"),
    (["--score", "judge"], "argument --score"),
    (["--pairing", "random"], "argument --pairing"),
    (["--prompts", "no/such.jsonl"], "no/such.jsonl"),
    (["--ref-update-every", "2", "--lora-r", "4"], "argument --ref-update-every"),
])
def test_bad_flags_fail_before_a_model_loads(tmp_path, tiny_model, setup, monkeypatch, capsys, flags, error):
    import ddpo.online as online_mod

    monkeypatch.setattr(online_mod, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["--model", tiny_model, "--prompts", setup[0], "--output-dir", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    # argparse prints its usage, then the one error line; main's own errors are the exit message
    last = str(stop.value.code) if stop.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert error in last and "\n" not in last, last
    assert not os.path.exists(tmp_path / "out")


def test_rounds_cycle_through_the_prompts_in_a_seeded_order():
    from ddpo.online import round_prompts

    prompts = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    cfg = type("C", (), {"prompts_per_round": 2, "seed": 1})
    drawn = [p["id"] for r in range(1, 6) for p in round_prompts(prompts, cfg, r)]
    assert sorted(drawn[:5]) == list(range(5)) and sorted(drawn[5:10]) == list(range(5))  # every prompt once a pass
    assert drawn[:5] != drawn[5:10]  # each pass its own order
    assert drawn == [p["id"] for r in range(1, 6) for p in round_prompts(prompts, cfg, r)]
