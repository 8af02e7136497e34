"""ddpo.pipeline end to end on a tiny model (no packaged models needed), and its resume."""

import json
import os

from ddpo.pipeline import main


def test_pipeline_end_to_end_and_resume(tmp_path, tiny_model, capsys):
    args = ["--quick", "--model", tiny_model, "--work-dir", str(tmp_path), "--semantic-embedder", "stylometric"]
    main(args)
    out = capsys.readouterr().out
    assert "| dpo |" in out and "| ddpo |" in out and "plot:" in out
    assert "difference to dpo" in out and "\nddpo - dpo: semantic diversity " in out  # the reading, after the tables
    for name in ("dpo", "ddpo"):
        metrics = json.load(open(tmp_path / "eval" / f"{name}.metrics.json"))
        assert metrics["prompts"] == 2 and metrics["samples"] == 6
        assert ("vs_baseline" in metrics) == (name == "ddpo")
        assert os.path.isdir(tmp_path / name / "checkpoint-2")
    pairs = [json.loads(line) for line in open(tmp_path / "pairs-deviation_both.jsonl")]
    assert pairs and all("weight" in p and p["meta"]["group_size"] == 3 for p in pairs)
    stamp = os.path.getmtime(tmp_path / "ddpo" / "checkpoint-2" / "model.safetensors")
    main(args)  # everything is there: no stage runs again
    assert os.path.getmtime(tmp_path / "ddpo" / "checkpoint-2" / "model.safetensors") == stamp
    assert "generating 3 samples for 0 prompts" in capsys.readouterr().out
