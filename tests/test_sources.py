"""ddpo/sources.py: every data flag reads JSONL, parquet, save_to_disk directories and Hub names alike."""

import hashlib
import json
import sys

import pytest

datasets = pytest.importorskip("datasets")  # the `data` extra, in the `test` extra too
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from conftest import write_jsonl  # noqa: E402

from ddpo import generate, sources  # noqa: E402
from ddpo.data import DataError, load_pairs  # noqa: E402

ROWS = [{"prompt": "p1", "chosen": "c1", "rejected": "r1", "weight": 0.5},
        {"prompt": [{"role": "user", "content": "p2"}], "chosen": "c2", "rejected": "r2", "weight": 2.0},
        {"prompt": "p3", "chosen": "c3", "rejected": "r3", "weight": 1.0}]


def as_tuples(pairs):
    return [(p.prompt, p.chosen, p.rejected, p.weight) for p in pairs]


def write_parquet(path, rows, row_group_size=None):
    # message lists and strings in one column do not make one Arrow type: a prompt column of one kind per file
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return str(path)


def string_rows():
    return [{**r, "prompt": r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][0]["content"]} for r in ROWS]


def test_parquet_save_to_disk_and_jsonl_give_the_same_pairs(tmp_path, monkeypatch):
    rows = string_rows()
    expected = as_tuples(load_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    assert expected == [("p1", "c1", "r1", 0.5), ("p2", "c2", "r2", 2.0), ("p3", "c3", "r3", 1.0)]
    monkeypatch.setattr(sources, "BATCH", 2)  # records cross batch and row-group boundaries
    single = write_parquet(tmp_path / "pairs.parquet", rows, row_group_size=1)
    (tmp_path / "dir").mkdir()
    write_parquet(tmp_path / "dir" / "a.parquet", rows[:2])
    write_parquet(tmp_path / "dir" / "b.parquet", rows[2:])
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows)}
                         ).save_to_disk(str(tmp_path / "splits"))
    for path in (single, str(tmp_path / "dir"), str(tmp_path / "saved"), f"{tmp_path}/splits:test"):
        assert as_tuples(load_pairs(path)) == expected, path
    assert as_tuples(load_pairs(str(tmp_path / "splits"))) == expected[:1]  # the train split by default
    # messages survive Arrow: a column of message lists
    messages = write_parquet(tmp_path / "messages.parquet", [ROWS[1]])
    assert as_tuples(load_pairs(messages)) == [as_tuples(load_pairs(write_jsonl(tmp_path / "m.jsonl", [ROWS[1]])))[0]]


def test_errors_name_the_record(tmp_path):
    rows = string_rows()
    rows[2]["weight"] = -1.0
    with pytest.raises(DataError, match=r"bad\.parquet:row 2: weight must be >= 0"):
        load_pairs(write_parquet(tmp_path / "bad.parquet", rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved:row 2: weight must be >= 0"):
        load_pairs(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"splits:dev: no split 'dev' \(it has train\); name one as DIR:split"):
        load_pairs(f"{tmp_path}/splits:dev")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable parquet file"):
        load_pairs(str(tmp_path / "junk.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: directory holds no .jsonl or .parquet files and is not a "):
        load_pairs(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"no/such\.parquet: no such file or directory"):
        load_pairs("no/such.parquet")


def test_columns_map_with_field_flags(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "w": r["weight"]}
            for r in string_rows()]
    got = load_pairs(write_parquet(tmp_path / "theirs.parquet", rows), weight_field="w",
                     fields={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert as_tuples(got) == as_tuples(load_pairs(write_jsonl(tmp_path / "ours.jsonl", string_rows())))
    prompts = generate.read_prompts(write_parquet(tmp_path / "q.parquet", [{"question": "a"}, {"question": "b"}]),
                                    "question")
    assert prompts == [{"id": "0", "prompt": "a"}, {"id": "1", "prompt": "b"}]
    with pytest.raises(DataError, match=r"q\.parquet:row 0: missing field 'prompt'"):
        generate.read_prompts(str(tmp_path / "q.parquet"))


def test_hub_names(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(string_rows())

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert as_tuples(load_pairs("org/name"))[0] == ("p1", "c1", "r1", 0.5)
    load_pairs("org/name:test")
    load_pairs("org/name:cfg:validation")
    load_pairs("org/name:train[90%:]")
    assert calls == [("org/name", None, "train"), ("org/name", None, "test"), ("org/name", "cfg", "validation"),
                     ("org/name", None, "train[90%:]")]
    assert [s for s, _ in sources.read_records("org/name:test")][:2] == ["org/name[test]:row 0", "org/name[test]:row 1"]
    for local in ("./pairs", "../pairs", "./pairs.jsonl"):  # a missing path, never a Hub name
        with pytest.raises(DataError, match="no such file or directory"):
            sources.locate(local)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_pairs("org/name")
    assert str(e.value) == ("org/name: cannot load the dataset (ConnectionError: Couldn't reach 'org/name' on the Hub "
                            "(LocalEntryNotFoundError))")


def test_without_the_extra_a_one_line_error_names_it(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "pairs.parquet", string_rows())
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", string_rows())
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert str(e.value) == f"{path}: reading parquet needs the optional extra 'data' (pip install -e '.[data]')"
    assert len(load_pairs(jsonl)) == 3  # JSONL needs nothing more


def test_digests_follow_the_content(tmp_path):
    rows = string_rows()
    a = write_parquet(tmp_path / "a.parquet", rows)
    assert sources.data_sha256(a) == sources.data_sha256(write_parquet(tmp_path / "b.parquet", rows))
    assert sources.data_sha256(a) != sources.data_sha256(write_parquet(tmp_path / "c.parquet", rows[:2]))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(rows[:2]).save_to_disk(str(tmp_path / "other"))
    assert sources.data_sha256(str(tmp_path / "saved")) != sources.data_sha256(str(tmp_path / "other"))
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    for path, kind in ((a, "parquet"), (jsonl, "jsonl"), (str(tmp_path / "saved"), "disk")):
        digest = hashlib.sha256()  # what the one read of a command feeds its digest, as data_sha256 says
        assert len(list(sources.read_records(path, digest=digest))) == 3
        assert sources.describe(path, digest) == {"input": path, "kind": kind, "sha256": sources.data_sha256(path)}


def test_prepare_reads_pools_from_parquet_with_column_flags(tmp_path):
    import ddpo.prepare as prep
    pools = [{"prompt": p, "response": f"{p} answer {i}{'!' * i}", "score": float(i)}
             for p in ("a", "b") for i in range(3)]
    theirs = [{"question": r["prompt"], "answer": r["response"], "votes": r["score"]} for r in pools]
    out = {}
    for name, path, flags in [("jsonl", write_jsonl(tmp_path / "pools.jsonl", pools), []),
                              ("parquet", write_parquet(tmp_path / "pools.parquet", theirs),
                               ["--prompt-field", "question", "--response-field", "answer", "--score-field", "votes"])]:
        prep.main(["--input", path, "--output", str(tmp_path / f"{name}.jsonl"), "--deviation", "style", "--gap", "1",
                   *flags])
        with open(tmp_path / f"{name}.jsonl") as f:
            out[name] = [json.loads(line) for line in f]
        with open(tmp_path / f"{name}.jsonl.meta.json") as f:
            meta = json.load(f)
        assert meta["source"] == {"input": path, "kind": name, "sha256": sources.data_sha256(path)}
    assert out["parquet"] == out["jsonl"] and len(out["jsonl"]) == 2
