"""Preference pairs: read and validate them, tokenise like TRL, truncate, batch [chosen; rejected].

Input: any source ddpo/sources.py reads (JSONL file or directory, parquet, a save_to_disk directory, a Hub dataset;
columns renamed by --prompt-field, --chosen-field, --rejected-field). One record per pair:
  {"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages], "weight": float (optional)}
or TRL's conversational format with an implicit prompt, whole conversations that share their prompt turns:
  {"chosen": [messages], "rejected": [messages], "weight": float (optional)}
where the shared leading messages become the prompt and what follows in each (assistant messages only) its
completion (implicit_prompt; plain strings without "prompt" are refused: a common string prefix does not mark where a
prompt ends). Messages are {"role": ..., "content": ...} dicts. Blank lines are skipped. Every problem is reported as
`file:line: message` before any model is loaded, and the whole file is checked before the first error is raised.

Tokenisation (as TRL's DPOTrainer, so first-step numbers agree):
  - with a chat template: a string prompt becomes [{"role": "user", ...}], a string completion
    [{"role": "assistant", ...}]; prompt ids = template(prompt, add_generation_prompt=True), full ids =
    template(prompt + completion); the template's end-of-turn tokens end the completion.
  - without one: prompt ids = tok(prompt), full ids = tok(prompt + completion + eos).
  - the completion starts where prompt ids and full ids first differ (the common prefix), for both completions.
Truncation (counted and reported): a prompt longer than max_prompt_length keeps its *last* tokens (the end of a
prompt is what the completion continues from); then a completion that does not fit in max_length keeps its
*first* tokens. Setting either to 0 disables it. ORPO and DORPO follow the released rule instead (TRL 0.8's ORPO
tokenisation, `orpo_rule`): only a pair whose prompt + *longer* completion exceeds max_length is cut, the prompt to its
last max_prompt_length tokens, then, if still too long, both completions to max_length - max_prompt_length tokens.
"""

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field

import torch
from ddpo_kernels.logprobs import IGNORE_INDEX

# where records come from (JSONL, parquet, datasets, the Hub) is ddpo/sources.py's; DataError stays importable here
from ddpo.sources import DataError, read_jsonl, read_records  # noqa: F401 (read_jsonl: importable here)


@dataclass
class Pair:
    prompt: object
    chosen: object
    rejected: object
    weight: float | None
    source: str  # "file:line"
    prompt_ids: list = field(default_factory=list)
    chosen_ids: list = field(default_factory=list)
    rejected_ids: list = field(default_factory=list)


TMP = ".tmp-"  # what atomic writers leave behind when killed: .tmp-<name>-<random>, removed by remove_temporaries


def temporary_path(path):
    """A fresh name beside `path` for writing it atomically: .tmp-<name of path>-<random>."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f"{TMP}{name}-{os.urandom(8).hex()}")


def remove_temporaries(directory, names):
    """Remove the leftovers of our killed writers from `directory`: entries named .tmp-<name>-<16 hex digits>
    (temporary_path's names) whose <name> matches the regular expression `names`, and nothing else: another
    .tmp-* entry is not ours to remove. Returns their names."""
    ours = re.compile(rf"{re.escape(TMP)}(?:{names})-[0-9a-f]{{16}}")
    left = sorted(e for e in os.listdir(directory) if ours.fullmatch(e)) if os.path.isdir(directory) else []
    for entry in left:
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return left


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def take_over_if_stale(path, what):
    """Remove the lock at `path` if its pid is no longer running on this host; else DataError naming its holder."""
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
        raise DataError(f"{what}: {path} is not a lock file this tool wrote (a link or a directory); remove it if no "
                        "run uses it")
    try:
        with open(path) as f:
            pid, _, host = f.read().strip().partition(" ")
    except FileNotFoundError:  # released meanwhile
        return
    if host == socket.gethostname() and pid.isdigit() and not alive(int(pid)):
        print(f"{path}: taking over the lock of pid {pid}, which is no longer running", flush=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    holder = f"pid {pid} on {host}" if pid.isdigit() and host else "an unknown process"
    raise DataError(f"{what}: in use by {holder} ({path}); wait for that run to end, or remove {path} if no run "
                    "uses it")


@contextlib.contextmanager
def hold_lock(path, what):
    """Hold the lock file `path` around the body: created with O_CREAT | O_EXCL, holding "<pid> <host>", removed when
    the body ends, also on errors. A lock whose pid is no longer running on this host is stale (its run was killed)
    and is taken over with a message; any other lock refuses, a DataError naming `what` (the flag) and the holder."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            take_over_if_stale(path, what)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    try:
        yield
    finally:
        os.remove(path)


# a file system's refusals at a path (disk full, a file size limit, a read-only or immutable file, a name too long, a
# link loop, a directory where a file goes): expected, so one line naming the path; any other OSError is a bug
FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                      errno.ENAMETOOLONG, errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY}


def refusal(e):
    """The reason (strerror) when an exception is a file system's refusal (FILE_SYSTEM_ERRORS), else None. Writers
    in Rust report one in their own type: safetensors' "... (os error 28)"."""
    if isinstance(e, OSError):
        return e.strerror if e.errno in FILE_SYSTEM_ERRORS else None
    if (code := re.search(r"\(os error (\d+)\)", str(e))) and int(code.group(1)) in FILE_SYSTEM_ERRORS:
        return os.strerror(int(code.group(1)))
    return None


class RecordingWriter:
    """A file's write that remembers the OSError it raised (torch_save)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.file.flush()


def torch_save(obj, path):
    """torch.save to a new file, a failed write raising its OSError (disk full, a file size limit): torch's own
    writer reports one as a RuntimeError that names no cause ("unexpected pos 704 vs 598")."""
    with open(path, "xb") as f:
        writer = RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error:
                raise writer.error from None
            raise


@contextlib.contextmanager
def written(path, directory=False):
    """Write `path` atomically: the body fills the temporary path this yields (a new directory when `directory`),
    which is then renamed onto `path`, so readers never see half a file. On any failure the temporary is removed; a
    file system's refusal is a DataError naming `path`. The one rule of every output ddpo writes whole."""
    tmp = temporary_path(path)
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        if directory:
            os.mkdir(tmp)  # the umask's mode, as any new directory (mkdtemp's would be private: 0700)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp)
            else:
                os.remove(tmp)
        if (reason := refusal(e)):
            raise DataError(f"{path}: cannot write it ({reason})") from None
        raise


def atomic_write(path, text):
    """Write text through `written`. The file gets the mode any new file gets (0666 less the umask; the kernel
    applies it), not mkstemp's private 0600."""
    with written(path) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as f:
            f.write(text)


def append(path, text, sync=False):
    """Append text to the file at path (and fsync it when `sync`); a file system's refusal is a DataError naming path
    (a torn last line it leaves is dropped by whoever resumes the file)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if sync:
                os.fsync(f.fileno())
    except OSError as e:
        if not refusal(e):
            raise
        raise DataError(f"{path}: cannot write it ({e.strerror})") from None


def one_line_errors(run, *args):
    """run(*args), a command's work, with its expected failures as one line (exit status 1): a DataError, and a file
    system's refusal at a path (FILE_SYSTEM_ERRORS). Anything else is a bug and keeps its traceback."""
    try:
        return run(*args)
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        if not refusal(e):
            raise
        where = "".join(f"{f}: " for f in (e.filename, e.filename2) if f is not None)
        sys.exit(f"error: {where}{e.strerror}")


def in_range(cast, low, high=math.inf, above=False, below=False):
    """An argparse type: `cast`, then finite, >= low (> low when `above`) and <= high (< high when `below`); NaN
    fails every comparison."""
    def parse(text):
        x = cast(text)
        if not (math.isfinite(x) and (x > low if above else x >= low) and (x < high if below else x <= high)):
            bounds = f"{'>' if above else '>='} {low}" + (f" and {'<' if below else '<='} {high}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return x
    parse.__name__ = cast.__name__  # argparse's "invalid float value" names it
    return parse


def check_not_input(output, source, flag="--output"):
    """Refuse an output that is the input itself (by any path, link or hard link) or a file in the input directory:
    writing it would replace what the user gave us."""
    out, src = os.path.realpath(output), os.path.realpath(source)
    same = os.path.exists(output) and os.path.exists(source) and os.path.samefile(output, source)
    if same or out == src or (os.path.isdir(src) and out.startswith(src + os.sep)):
        raise DataError(f"{flag} {output}: is the input {source} or inside it; write the output elsewhere")


def existing_ancestor(path, what):
    """The nearest existing ancestor of path, where the first write goes; a DataError (what: the flag and its value)
    for a broken link or a link loop on the way, through which nothing can be created."""
    directory = os.path.abspath(path)
    while not os.path.exists(directory):
        if os.path.islink(directory):
            raise DataError(f"{what}: {directory} is a broken link or a link loop")
        directory = os.path.dirname(directory)
    return directory


def check_writable(output, flag="--output"):
    """Refuse an output file that cannot be written, before any model loads; creates nothing."""
    if not output:
        raise DataError(f"{flag}: an empty path; name a file")
    if os.path.isdir(output):
        raise DataError(f"{flag} {output}: is a directory")
    directory = existing_ancestor(os.path.dirname(os.path.abspath(output)), f"{flag} {output}")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
        if os.path.exists(output):
            open(output, "ab").close()
    except OSError as e:
        raise DataError(f"{flag} {output}: cannot write there ({e.strerror})") from None


def check_output_dir(path, flag="--output-dir"):
    """DataError unless path is, or can be created as, a writable directory; creates nothing."""
    if not path:
        raise DataError(f"{flag}: an empty path; name a directory (. for this one)")
    existing = existing_ancestor(path, f"{flag} {path}")
    if not os.path.isdir(existing):
        raise DataError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {path}: {existing} is not writable")


MAX_TEXT_CHARS = 4_000_000  # about a million tokens: beyond any context, and bounded before a tokenizer sees it


def text_size(value):
    """The characters of a string, or of a message list's contents."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(m["content"]) for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))
    return 0


def check_size(value, name):
    """A text (string or message list) of at most MAX_TEXT_CHARS characters. Returns an error or None."""
    if (size := text_size(value)) > MAX_TEXT_CHARS:
        return f"field {name!r} has {size:,} characters, over the {MAX_TEXT_CHARS:,} ddpo reads"
    return None


def check_text(value, name, roles=None):
    """A non-empty string, or a non-empty list of {"role", "content"} messages, of at most MAX_TEXT_CHARS
    characters. Returns an error or None."""
    if (problem := check_size(value, name)):
        return problem
    if isinstance(value, str):
        return None if value.strip() else f"field {name!r} is empty"
    if isinstance(value, list):
        if not value:
            return f"field {name!r} is an empty message list"
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return f"field {name!r}, message {i}: expected {{\"role\": str, \"content\": str}}"
            if roles and m["role"] not in roles:
                return f"field {name!r}, message {i}: role {m['role']!r} not in {sorted(roles)}"
        if not any(m["content"].strip() for m in value):
            return f"field {name!r} has only empty messages"
        return None
    return f"field {name!r} must be a string or a list of messages, got {type(value).__name__}"


def finite_number(value):
    """A JSON number that is finite as a float (JSON integers have no bound; 10**400 is no float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= sys.float_info.max if isinstance(value, int) else math.isfinite(value)


def check_weight(value, name="weight"):
    """A finite number >= 0 (`name` is the field it came from). Returns an error or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if not finite_number(value):
        return f"{name} must be finite, got {value if isinstance(value, float) else 'an integer beyond float range'}"
    if value < 0:
        return f"{name} must be >= 0, got {value!r}"
    return None


def implicit_prompt(chosen, rejected):
    """TRL's conversational preference format with an implicit prompt: `chosen` and `rejected` are whole
    conversations that share their prompt turns. The shared leading messages are the prompt; what follows in each must
    be assistant messages, its completion. Returns ((prompt, chosen, rejected), None), or (None, problem).

    Only conversations: for plain strings a common prefix does not mark where the prompt ends ("The sky is blue." and
    "The sky is bright." share "The sky is b"), so string records need their 'prompt' field."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return None, ("missing field 'prompt' (an implicit prompt is taken only from conversations: 'chosen' and "
                      "'rejected' as message lists that share their prompt turns; plain strings need 'prompt')")
    for value, name in ((chosen, "chosen"), (rejected, "rejected")):
        if (problem := check_text(value, name)):
            return None, problem
    n = common_prefix_length(chosen, rejected)
    if n == 0:
        return None, ("no field 'prompt', and 'chosen' and 'rejected' share no leading messages to take as the "
                      "implicit prompt")
    for value, name, other in ((chosen, "chosen", "rejected"), (rejected, "rejected", "chosen")):
        if len(value) == n:
            return None, (f"field {name!r} has no messages after the implicit prompt (the {n} leading messages it "
                          f"shares with {other!r})")
        for i in range(n, len(value)):
            if value[i]["role"] != "assistant":
                return None, (f"field {name!r}, message {i}: role {value[i]['role']!r} after the implicit prompt "
                              f"(the {n} leading messages it shares with {other!r}); what follows the prompt must "
                              "be assistant messages")
    return (chosen[:n], chosen[n:], rejected[n:]), None


def load_pairs(path, max_errors=10, weight_field="weight", fields=None, digest=None):
    """Read and validate pairs from any source of ddpo.sources (`fields`: our names -> the input's columns). Raises
    DataError listing up to max_errors problems with file:line (or file:row N).

    A record without 'prompt' whose 'chosen' and 'rejected' are conversations takes its prompt from their shared
    leading messages (implicit_prompt). The weight is read from `weight_field` (--weight-field): optional under its
    default name 'weight', required in every record under any other name. `digest`: as read_jsonl's."""
    if not weight_field:
        raise DataError("--weight-field: empty field name")
    pairs, errors = [], []
    for source, rec in read_records(path, fields, digest):
        problems = [f"missing field {k!r}" for k in ("prompt", "chosen", "rejected") if k not in rec]
        texts = tuple(rec.get(k) for k in ("prompt", "chosen", "rejected"))
        if problems == ["missing field 'prompt'"]:  # TRL's implicit prompt, or the reason it is not one
            texts, problem = implicit_prompt(rec["chosen"], rec["rejected"])
            problems = [problem] if problem else []
        if not problems:
            problems = [p for p in (check_text(texts[0], "prompt" if "prompt" in rec else "implicit prompt"),
                                    check_text(texts[1], "chosen", roles={"assistant"}),
                                    check_text(texts[2], "rejected", roles={"assistant"})) if p]
        weight = rec.get(weight_field)
        if weight_field != "weight" and weight_field not in rec:
            problems.append(f"missing field {weight_field!r} (the weight, named by --weight-field)")
        elif (weight is not None or weight_field != "weight") and (p := check_weight(weight, weight_field)):
            problems.append(p)
        errors += [f"{source}: {p}" for p in problems]
        if len(errors) >= max_errors:
            break
        if not problems:
            pairs.append(Pair(*texts, None if weight is None else float(weight), source))
    if errors:
        raise DataError("bad preference data:\n  " + "\n  ".join(errors[:max_errors]))
    if not pairs:
        raise DataError(f"{path}: no preference pairs (the file is empty)")
    return pairs


def as_messages(value, role):
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def common_prefix_length(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_ids(tokenizer, messages, **kwargs):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def prompt_ids(tokenizer, prompt):
    """The token ids of a prompt as training and sampling (ddpo.generate) both see it: with a chat template, the
    template of its messages (a string is one user message) and the generation prompt; without, its text."""
    if tokenizer.chat_template:
        return chat_ids(tokenizer, as_messages(prompt, "user"), add_generation_prompt=True)
    return tokenizer(prompt)["input_ids"]


def tokenize_pair(tokenizer, prompt, chosen, rejected):
    """(prompt_ids, chosen_ids, rejected_ids), as TRL builds them (module docstring)."""
    if not tokenizer.chat_template and not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        raise DataError("message lists need a tokenizer with a chat template; this one has none")
    ids = prompt_ids(tokenizer, prompt)
    if tokenizer.chat_template:
        chosen_full = chat_ids(tokenizer, as_messages(prompt, "user") + as_messages(chosen, "assistant"))
        rejected_full = chat_ids(tokenizer, as_messages(prompt, "user") + as_messages(rejected, "assistant"))
    else:
        eos = tokenizer.eos_token or ""
        chosen_full = tokenizer(prompt + chosen + ("" if chosen.endswith(eos) else eos))["input_ids"]
        rejected_full = tokenizer(prompt + rejected + ("" if rejected.endswith(eos) else eos))["input_ids"]
    n = min(common_prefix_length(ids, chosen_full), common_prefix_length(ids, rejected_full))
    return ids[:n], chosen_full[n:], rejected_full[n:]


def tokenize_pairs(pairs, tokenizer, max_length=0, max_prompt_length=0, orpo_rule=False):
    """Fill the ids of every pair in place and truncate (module docstring). Returns counts for the log."""
    if max_length and max_prompt_length and max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    stats = {"pairs": len(pairs), "prompts_truncated": 0, "completions_truncated": 0}
    for pair in pairs:
        try:
            prompt_ids, chosen_ids, rejected_ids = tokenize_pair(tokenizer, pair.prompt, pair.chosen, pair.rejected)
        except DataError as e:
            raise DataError(f"{pair.source}: {e}") from None
        if not chosen_ids or not rejected_ids:
            raise DataError(f"{pair.source}: a completion has no tokens after the prompt")
        if not prompt_ids:  # nothing would predict a completion's first token
            raise DataError(f"{pair.source}: the prompt has no token of its own (it is empty, or its text merges "
                            "with the completions' first tokens and the tokenizer adds no BOS); give it one")
        longer = max(len(chosen_ids), len(rejected_ids))
        # the released ORPO rule cuts only a pair that does not fit, however long its prompt
        over = bool(max_length) and len(prompt_ids) + longer > max_length
        if max_prompt_length and len(prompt_ids) > max_prompt_length and (over or not orpo_rule):
            prompt_ids = prompt_ids[-max_prompt_length:]
            stats["prompts_truncated"] += 1
        if max_length:
            released = orpo_rule and max_prompt_length and len(prompt_ids) + longer > max_length
            room = max_length - (max_prompt_length if released else len(prompt_ids))
            if room <= 0:
                raise DataError(f"{pair.source}: the prompt alone fills max_length={max_length}; "
                                f"set --max-prompt-length below it")
            for ids in (chosen_ids, rejected_ids):
                if len(ids) > room:
                    del ids[room:]
                    stats["completions_truncated"] += 1
        pair.prompt_ids, pair.chosen_ids, pair.rejected_ids = prompt_ids, chosen_ids, rejected_ids
    return stats


@dataclass
class Batch:
    """A micro-batch of token sequences, in one of three layouts (make_batch picks one):
    padded: one sequence per row, right-padded, attention_mask set, each tensor (S, T);
    packed: every sequence in one row without padding, position_ids restarting at 0 per sequence, each (1, L);
    shared: packed, but each pair's prompt once, followed by its chosen and then its rejected completion, both at the
      positions after the prompt (the rejected one attends to the prompt and itself, not to the chosen one).
    labels hold the token ids at completion positions and IGNORE_INDEX elsewhere; seq_ids says which sequence each
    position belongs to (a shared prompt: its chosen sequence's). Sequences 0..B-1 are the chosen completions,
    B..2B-1 the rejected (when present). The label at position t is predicted at t - 1, or in the shared layout at
    predicted_at[t] (the prompt's last position for a rejected completion's first token). segments (packed layouts):
    per sequence its (length,), or per pair sharing a prompt its (prompt, chosen, rejected) lengths."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    seq_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None  # padded layout only
    position_ids: torch.Tensor | None = None  # packed layouts only
    segments: list | None = None  # packed layouts only
    predicted_at: torch.Tensor | None = None  # shared layout only

    def to(self, device):
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in (
            "input_ids", "labels", "seq_ids", "attention_mask", "position_ids", "predicted_at")
            if getattr(self, k) is not None})

    @property
    def packed(self):
        return self.position_ids is not None

    @property
    def tokens(self):
        """The sequences' tokens (prompt and completion each), whatever the layout: a shared prompt counts for both
        of its sequences, padding for none."""
        if self.segments is not None:  # (length,) or (prompt, completion, completion, ...)
            return sum(group[0] * max(1, len(group) - 1) + sum(group[1:]) for group in self.segments)
        return int(self.attention_mask.sum())


def completion_sequences(pairs, rejected=True):
    """(prompt ids, completion ids) of [chosen; rejected] (the chosen alone when not `rejected`)."""
    return [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs if rejected]


def collate(pairs, pad_token_id, rejected=True):
    """Stack [chosen; rejected] of a micro-batch (the chosen alone when not `rejected`), right-padded: a Batch of
    (2B, T) tensors whose rows 0..B-1 are the chosen sequences, B..2B-1 the rejected."""
    sequences = completion_sequences(pairs, rejected)
    T = max(len(prompt) + len(completion) for prompt, completion in sequences)
    input_ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)  # (2B, T)
    labels = torch.full((len(sequences), T), IGNORE_INDEX, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)  # (2B, T)
    for i, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        labels[i, len(prompt):n] = torch.tensor(completion, dtype=torch.long)
        attention_mask[i, :n] = 1
    seq_ids = torch.arange(len(sequences))[:, None].expand(-1, T)  # (2B, T)
    return Batch(input_ids, labels, seq_ids, attention_mask=attention_mask)


def collate_packed(pairs, rejected=True, share_prompts=False):
    """The same sequences as `collate`, packed into one row without padding (no FLOPs spent on pad tokens): a Batch
    of (1, L) tensors. Positions restart at 0 for every sequence, which transformers turns into a block-diagonal
    causal mask when no attention mask is given. With share_prompts (and rejected), each pair's prompt appears once,
    followed by its chosen and its rejected completion (the shared layout: its attention needs
    models.segment_attention, which reads the segments)."""
    if not (share_prompts and rejected):
        ids, labels, positions, seq_ids, segments = [], [], [], [], []
        for i, (prompt, completion) in enumerate(completion_sequences(pairs, rejected)):
            ids += prompt + completion
            labels += [IGNORE_INDEX] * len(prompt) + completion
            positions += range(len(prompt) + len(completion))
            seq_ids += [i] * (len(prompt) + len(completion))
            segments.append((len(prompt) + len(completion),))
        input_ids, labels, positions, seq_ids = (torch.tensor([x]) for x in (ids, labels, positions, seq_ids))  # (1, L)
        return Batch(input_ids, labels, seq_ids, position_ids=positions, segments=segments)
    ids, labels, positions, seq_ids, predicted_at, segments = [], [], [], [], [], []
    for i, p in enumerate(pairs):
        start, n_prompt = len(ids), len(p.prompt_ids)
        ids += p.prompt_ids + p.chosen_ids + p.rejected_ids
        labels += [IGNORE_INDEX] * n_prompt + p.chosen_ids + p.rejected_ids
        positions += [*range(n_prompt + len(p.chosen_ids)), *range(n_prompt, n_prompt + len(p.rejected_ids))]
        seq_ids += [i] * (n_prompt + len(p.chosen_ids)) + [len(pairs) + i] * len(p.rejected_ids)
        after_chosen = start + n_prompt + len(p.chosen_ids)  # where the rejected completion starts in the row
        predicted_at += [*range(start - 1, after_chosen - 1), start + n_prompt - 1,  # after the prompt, as the chosen
                         *range(after_chosen, after_chosen + len(p.rejected_ids) - 1)]
        segments.append((n_prompt, len(p.chosen_ids), len(p.rejected_ids)))
    input_ids, labels, positions, seq_ids, predicted_at = (torch.tensor([x]) for x in (
        ids, labels, positions, seq_ids, predicted_at))  # (1, L)
    return Batch(input_ids, labels, seq_ids, position_ids=positions, segments=segments, predicted_at=predicted_at)


def make_batch(pairs, pad_token_id, device, packing=True, rejected=True, share_prompts=False):
    """A micro-batch on `device`: packed in one row (collate_packed; with share_prompts, each pair's prompt once) or
    padded (collate); the chosen alone when not `rejected`."""
    batch = collate_packed(pairs, rejected, share_prompts) if packing else collate(pairs, pad_token_id, rejected)
    return batch.to(device)


def epoch_order(n, seed, epoch):
    """The seeded shuffle of epoch `epoch`: a pure function of (n, seed, epoch), so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def text_of(value):
    """The text of a completion: a string, or the contents of its messages."""
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def pool_order(pairs):
    """A prompt's pool: the distinct responses of its pairs [(chosen, rejected, ...), ...] in order of first appearance,
    chosen before rejected. ddpo.prepare and the in-step path (response_pools) both embed pools in this order, so
    embedders that standardise over what they embed together (the stylometric profile) give both the same weights."""
    return list(dict.fromkeys(x for pair in pairs for x in pair[:2]))


def response_pools(pairs):
    """The pool of each prompt (pool_order of its pairs' texts), prompt by prompt in order of first appearance.

    Returns texts (M strings), text_prompt (M,) prompt id of each text, pair_prompt (P,) prompt id of each pair and
    pair_chosen (P,) the text index of each pair's chosen response.
    """
    members = {}  # prompt key -> indices of its pairs
    for i, pair in enumerate(pairs):
        members.setdefault(json.dumps(pair.prompt), []).append(i)
    texts, text_prompt, pair_prompt, pair_chosen = [], [], [0] * len(pairs), [0] * len(pairs)
    for g, indices in enumerate(members.values()):
        pool = pool_order([(text_of(pairs[i].chosen), text_of(pairs[i].rejected)) for i in indices])
        slot = {text: len(texts) + k for k, text in enumerate(pool)}
        for i in indices:
            pair_prompt[i], pair_chosen[i] = g, slot[text_of(pairs[i].chosen)]
        texts += pool
        text_prompt += [g] * len(pool)
    return texts, *(torch.tensor(x, dtype=torch.long) for x in (text_prompt, pair_prompt, pair_chosen))


def micro_batches(n_pairs, batch_size, seed, epoch):
    """Pair indices of each micro-batch of an epoch, in order: the seeded shuffle cut into batch_size pieces."""
    order = epoch_order(n_pairs, seed, epoch)
    return [order[i:i + batch_size] for i in range(0, n_pairs, batch_size)]


def optimizer_steps(n_pairs, batch_size, per_step, seed, epochs=0.0, max_steps=0):
    """Every optimiser step of a run, in order: (epoch position, micro-batches), per_step micro-batches a step.

    Every pair is trained exactly once per epoch, each epoch in its own seeded order. max_steps > 0 runs that many
    steps (over as many epochs as needed); else `epochs`, whose fractional last epoch is cut to its first steps.
    The epoch position of a step is epoch + (steps done in it) / (its steps), e.g. 1.5 halfway through the second.
    """
    steps, epoch = [], 0
    while (len(steps) < max_steps) if max_steps else (epoch < epochs):
        batches = micro_batches(n_pairs, batch_size, seed, epoch)
        epoch_steps = [batches[i:i + per_step] for i in range(0, len(batches), per_step)]
        full = len(epoch_steps)
        if not max_steps and epoch + 1 > epochs:  # rounded first: (1.1 - 1) * 10 is 1.0000000000000009, not 1
            epoch_steps = epoch_steps[:math.ceil(round((epochs - epoch) * full, 9))]
        steps += [(epoch + (k + 1) / full, step) for k, step in enumerate(epoch_steps)]
        epoch += 1
    return steps[:max_steps] if max_steps else steps
