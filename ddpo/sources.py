"""Records from where users keep them: the one reader behind every data flag (ddpo.train --data/--eval-data/
--eval-prompts, ddpo.prepare --input, --prompts of generate and online).

`path` is one of:
  - a JSONL file, or a directory of *.jsonl files read in name order: `file:line` in errors;
  - a .parquet file, or a directory of *.parquet files read in name order: `file:row N` (N from 0, as pandas and
    datasets index rows);
  - a `datasets.save_to_disk` directory: a Dataset, or a DatasetDict read at its split `DIR:split` (default train):
    `DIR[split]:row N`;
  - a Hugging Face Hub dataset `ORG/NAME`, `ORG/NAME:split` or `ORG/NAME:config:split` (default split train; a
    split may be sliced as datasets slices it, `train[:90%]`): `ORG/NAME[split]:row N`. A local path wins.
Everything but JSONL needs the optional extra `data` (pip install -e '.[data]': datasets, pyarrow).

Memory: records are yielded one at a time. Parquet is read one batch of at most BATCH rows at a time (a row group is
never decoded whole); save_to_disk and Hub datasets are Arrow files that datasets memory-maps (the Hub's are first
downloaded to its cache), read in batches of BATCH rows. So the reader holds at most BATCH decoded records beside
what its caller keeps: the texts are never held twice.
"""

import hashlib
import importlib
import json
import os
import re

BATCH = 1024  # rows decoded at a time from parquet or Arrow
PART = r"[\w.-]+(?:\[[^\]]*\])?"  # a config, or a split with datasets' slicing: train, train[:90%]
HUB_NAME = re.compile(rf"(?P<name>[\w.-]+/[\w.-]+)(?::(?P<first>{PART}))?(?::(?P<second>{PART}))?")
EXTRA = "pip install -e '.[data]'"


class DataError(ValueError):
    """Bad input, with every message prefixed by file:line (or its record's name: file:row N, DIR[split]:row N)."""


def files_with(path, suffix):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(suffix))


def jsonl_files(path):
    if os.path.isdir(path):
        files = files_with(path, ".jsonl")
        if not files:
            raise DataError(f"{path}: directory holds no .jsonl files")
        for file in files:
            if not os.path.isfile(file):
                what = "a directory" if os.path.isdir(file) else "a broken link" if os.path.islink(file) else "no file"
                raise DataError(f"{file}: is {what}, not a JSONL file; remove it or rename it (the data is every "
                                f"*.jsonl file in {path})")
        return files
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    return [path]


def read_jsonl(path, digest=None):
    """Yield (source, record) for every non-blank line of a JSONL file or directory; DataError on bad UTF-8 or JSON,
    or a lone surrogate (an unpaired \\ud800-\\udfff escape: no text, and no UTF-8 file can hold it). `digest` (a
    hashlib sha256) receives the sha256 of each file's content in reading order, from this one read: a FIFO or a
    process substitution can be read once only."""
    for file in jsonl_files(path):
        content = hashlib.sha256()
        with open(file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                content.update(raw)
                if (record := parse_line(raw, f"{file}:{lineno}")) is not None:
                    yield f"{file}:{lineno}", record
        if digest is not None:
            digest.update(content.digest())


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def has_surrogate(record):
    """Whether a string of the record holds a lone surrogate (which no UTF-8 text can)."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_line(raw, source):
    """The JSON object on one line (bytes), None for a blank line; DataError naming `source` (file:line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: invalid UTF-8 ({e.reason} at byte {e.start + 1})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{source}: JSON nested too deeply") from None
    except ValueError as e:  # an integer of over 4,300 digits
        raise DataError(f"{source}: malformed JSON ({str(e).split(';')[0]})") from None
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
    # only a \u escape can make a surrogate (UTF-8 cannot hold one); a valid pair decodes to one character
    if SURROGATE_ESCAPE.search(line) and has_surrogate(record):
        raise DataError(f"{source}: lone surrogate (an unpaired \\ud800-\\udfff escape): not text")
    return record


def is_saved_dataset(path):
    return any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def locate(path):
    """(kind, location, config, split): kind is jsonl, parquet, disk (save_to_disk) or hub. DataError when `path`
    is none of them."""
    if os.path.isdir(path):
        if files_with(path, ".jsonl"):
            return "jsonl", path, None, None
        if files_with(path, ".parquet"):
            return "parquet", path, None, None
        if is_saved_dataset(path):
            return "disk", path, None, None
        raise DataError(f"{path}: directory holds no .jsonl or .parquet files and is not a datasets.save_to_disk "
                        "directory")
    if os.path.exists(path):
        return ("parquet" if path.endswith(".parquet") else "jsonl"), path, None, None
    head, _, split = path.rpartition(":")
    if head and os.path.isdir(head) and is_saved_dataset(head):
        return "disk", head, None, split
    local = path.startswith((".", "/", "~")) or path.endswith((".jsonl", ".json", ".parquet"))
    if (hub := HUB_NAME.fullmatch(path)) and not local:
        first, second = hub["first"], hub["second"]
        return "hub", hub["name"], (first if second else None), (second or first or "train")
    raise DataError(f"{path}: no such file or directory")


def need_extra(path, what):
    for module in ("datasets", "pyarrow"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise DataError(f"{path}: reading {what} needs the optional extra 'data' ({EXTRA})") from None


def load_arrow(kind, location, config, split):
    """A datasets.Dataset, memory-mapped: a save_to_disk directory at `split`, or a Hub dataset (downloaded to the
    datasets cache first)."""
    import datasets
    name = location if kind == "hub" else f"{location}{':' + split if split else ''}"
    try:
        if kind == "hub":
            return datasets.load_dataset(location, config, split=split)
        ds = datasets.load_from_disk(location)
    except Exception as e:  # offline, unknown name or split, a corrupt directory: datasets raises many kinds
        first_line = str(e).splitlines()[0][:200] if str(e) else ""
        raise DataError(f"{name}: cannot load the dataset ({type(e).__name__}: {first_line})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(f"{name}: no split {split!r} (it has {', '.join(ds)}); name one as DIR:split")
        return ds[split]
    return ds


def parquet_files(path):
    return files_with(path, ".parquet") if os.path.isdir(path) else [path]


def read_table_rows(files):
    """Yield (source, record) of parquet files, BATCH rows decoded at a time."""
    import pyarrow.parquet as pq
    for file in files:
        try:
            reader = pq.ParquetFile(file)
            row = 0
            for batch in reader.iter_batches(batch_size=BATCH):
                for record in batch.to_pylist():
                    yield f"{file}:row {row}", record
                    row += 1
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{file}: not a readable parquet file ({str(e).splitlines()[0][:200]})") from None


def read_records(path, fields=None, digest=None):
    """Yield (source, record) for every record at `path` (module docstring); `fields` maps our field names to the
    columns that hold them (--prompt-field and the like): record[ours] = record.pop(theirs). `digest` (a hashlib
    sha256) receives the content's digest, as data_sha256 computes it: JSONL's from this one read (read_jsonl)."""
    kind, location, config, split = locate(path)
    if kind == "jsonl":
        rows = read_jsonl(location, digest)
    elif kind == "parquet":
        need_extra(path, "parquet")
        files = parquet_files(location)
        add_file_digests(digest, files)
        rows = read_table_rows(files)
    else:
        need_extra(path, "a saved or Hub dataset")
        ds = load_arrow(kind, location, config, split)
        add_fingerprint(digest, ds)
        name = f"{location}[{split or 'train'}]" if kind == "hub" or split else location
        rows = ((f"{name}:row {i}", r) for i, r in enumerate(r for b in ds.iter(batch_size=BATCH) for r in unbatch(b)))
    renames = {ours: theirs for ours, theirs in (fields or {}).items() if theirs and theirs != ours}
    for source, record in rows:
        for ours, theirs in renames.items():
            if theirs in record:
                record[ours] = record.pop(theirs)
        yield source, record


def unbatch(batch):
    """Dataset.iter's {column: [values]} -> one dict per row."""
    return (dict(zip(batch, values)) for values in zip(*batch.values()))


def add_file_digests(digest, files):
    """Feed `digest` (None: nothing) each file's sha256 in reading order, as read_jsonl feeds JSONL's."""
    for file in files if digest is not None else []:
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())


def add_fingerprint(digest, ds):
    """Feed `digest` (None: nothing) a saved or Hub dataset's fingerprint (a hash of its files and transforms)."""
    if digest is not None:
        digest.update(ds._fingerprint.encode())


def data_sha256(path):
    """A digest of the content at `path` (the path itself may move), as read_records' `digest` receives it, without
    reading the records."""
    kind, location, config, split = locate(path)
    digest = hashlib.sha256()
    if kind in ("jsonl", "parquet"):
        add_file_digests(digest, jsonl_files(location) if kind == "jsonl" else parquet_files(location))
    else:
        need_extra(path, "a saved or Hub dataset")
        add_fingerprint(digest, load_arrow(kind, location, config, split))
    return digest.hexdigest()


def describe(path, digest):
    """What an output's meta records of its input: the path, its kind, the sha256 of its content (`digest`, fed by
    the one read_records read of it), and for a Hub dataset the cache directory of the revision read (its last
    component is the dataset's commit)."""
    kind, location, config, split = locate(path)
    out = {"input": path, "kind": kind, "sha256": digest.hexdigest()}
    if kind == "hub":
        files = load_arrow(kind, location, config, split).cache_files
        out["revision_dir"] = os.path.dirname(files[0]["filename"]) if files else None
    return out


PAIR_FIELDS = ("prompt", "chosen", "rejected")
POOL_FIELDS = ("prompt", "response", "score")


def field_map(cfg, names):
    """{our field: the input's column} from the --<name>-field flags of `cfg`."""
    return {name: getattr(cfg, f"{name}_field") for name in names}
