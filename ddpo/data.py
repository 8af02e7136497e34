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

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field

import torch
from ddpo_kernels.logprobs import IGNORE_INDEX

# where records come from (JSONL, parquet, datasets, the Hub) is ddpo/sources.py's; DataError stays importable here
from ddpo.sources import DataError, read_records


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
    default name 'weight', required in every record under any other name. `digest`: as read_records'."""
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
