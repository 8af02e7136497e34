"""euclaise/WritingPrompts_preferences (the paper's data) -> scored pools, as the released scripts build them.

One record per r/WritingPrompts post: post_title, post_text, post_scores, comment_texts[], comment_scores[] (raw
votes), comment_times[]. ddpo.prepare --from writingprompts reads it from any source of ddpo/sources.py (the Hub name,
its parquet files, a save_to_disk copy). The released rules (DiversityTuning, commit cb06958, scripts_dataset_cleaner/):
  - prompt = the title without its leading [XX] tag (regex ^\\[.*?\\], then stripped) + "\\n" + the post's text
    (0_data_prep_scoring.py: clean_title; 2_data_prep_to_preference.py: the prompt);
  - a comment holding "**Welcome to the Prompt!**", "this submission has been removed" or "**Off-Topic Discussion**"
    (the moderator's and removed ones) is dropped (1_data_prep_filtering.py: filtering);
  - a comment is dropped when the user/assistant conversation of prompt and comment, in the policy's chat template
    and tokenised again as text (so a template's BOS counts twice, as released), has more than --max-response-tokens
    tokens (released: 2048 under Llama-3.1-8B-Instruct; 1_data_prep_filtering.py: remove_long);
  - score = the comment's raw votes, what the released gap pairing compares (2_data_prep_to_preference.py);
  - the transformed score (models/utils.py: transform_scores, 100 rounds of log(x + 1) of votes shifted to start at
    1, mapped to [-1, 1] by the dataset's min and max votes over every comment before filtering) is kept in each
    pair's meta, as `released` and `intended`. They differ in one line: released iterates the end points from the
    *unshifted* min and max votes (so its ends are not -1 and 1, and a min vote <= -1 makes every score NaN, written
    null), intended from the shifted ones (1 and max - min + 1).
Not released behaviour: each post is its own pool, as released (reposts of one prompt are not merged); posts with no
comments (on which the released step 0 fails) and with an empty prompt are skipped and counted; duplicate comments of
a post are one response; the released 90/10 train/validation split is not made here (split the output, or read a
split by name).
"""

import math
import re
from collections import OrderedDict

import numpy as np

from ddpo.sources import DataError, read_records

DROP_MARKERS = ("**Welcome to the Prompt!**", "this submission has been removed", "**Off-Topic Discussion**")
COLUMNS = ("post_title", "post_text", "comment_texts", "comment_scores")
ROUNDS = 100  # transform_scores' compression_factor


def clean_title(title):
    """The title without its leading [XX] tag (released clean_title: only when the title starts with one)."""
    found = re.match(r"\[.*?\]", title)
    return title[found.end():].strip() if found else title


def transformed_score(votes, low, high, released=True):
    """transform_scores of one vote count, given the dataset's min and max votes; None where it is not finite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x, lo, hi = np.float64(votes - low + 1), np.float64(low if released else 1), np.float64(
            high if released else high - low + 1)
        for _ in range(ROUNDS):
            x, lo, hi = np.log(x + 1), np.log(lo + 1), np.log(hi + 1)
        value = float(2 * (x - lo) / (hi - lo) - 1)
    return value if math.isfinite(value) else None


def conversation_tokens(tokenizer):
    """The token count of a (prompt, comment) conversation as released: the chat template as text, tokenised."""
    def count(prompt, comment):
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": comment}], tokenize=False)
        else:
            text = prompt + comment
        return len(tokenizer(text)["input_ids"])
    return count


def check_record(source, rec):
    for key in COLUMNS:
        if key not in rec:
            raise DataError(f"{source}: missing column {key!r} (euclaise/WritingPrompts_preferences has "
                            f"{', '.join(COLUMNS)}, ...)")
    for key in ("post_title", "post_text"):
        if not isinstance(rec[key], (str, type(None))):
            raise DataError(f"{source}: {key} must be a string, got {type(rec[key]).__name__}")
    texts, scores = rec["comment_texts"] or [], rec["comment_scores"] or []
    for key, value in (("comment_texts", texts), ("comment_scores", scores)):
        if not isinstance(value, list):
            raise DataError(f"{source}: {key} must be a list, got {type(value).__name__}")
    if len(texts) != len(scores):
        raise DataError(f"{source}: {len(texts)} comment_texts but {len(scores)} comment_scores")
    for i, (t, s) in enumerate(zip(texts, scores)):
        if not isinstance(t, str):
            raise DataError(f"{source}: comment_texts[{i}] must be a string, got {type(t).__name__}")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise DataError(f"{source}: comment_scores[{i}] must be a finite number, got {s!r}")
    return texts, scores


def read_writingprompts(path, count_tokens=None, max_tokens=0, digest=None):
    """Returns (groups, counts): groups as ddpo.prepare's read_input builds them, one per post with comments left,
    each with "transformed": [(released, intended)] per response; counts of what was dropped and why."""
    posts, low, high = [], math.inf, -math.inf
    counts = {"posts": 0, "no_comment_posts": 0, "empty_prompt_posts": 0, "comments": 0, "dropped_moderator": 0,
              "dropped_long": 0, "dropped_empty": 0, "dropped_duplicate": 0}
    for source, rec in read_records(path, digest=digest):
        texts, scores = check_record(source, rec)
        counts["posts"] += 1
        counts["comments"] += len(texts)
        low, high = min([low, *scores]), max([high, *scores])  # over every comment, before filtering (released)
        prompt = f"{clean_title(rec['post_title'] or '')}\n{rec['post_text'] or ''}"
        if not texts:
            counts["no_comment_posts"] += 1
            continue
        if not prompt.strip():
            counts["empty_prompt_posts"] += 1
            continue
        kept = {}  # text -> votes, the first of duplicates
        for t, s in zip(texts, scores):
            reason = ("moderator" if any(m in t for m in DROP_MARKERS) else "empty" if not t.strip()
                      else "duplicate" if t in kept
                      else "long" if max_tokens and count_tokens(prompt, t) > max_tokens else None)
            if reason:
                counts[f"dropped_{reason}"] += 1
            else:
                kept[t] = s
        posts.append((source, prompt, kept))
    if not counts["posts"]:
        raise DataError(f"{path}: no records (the file is empty)")
    groups = OrderedDict()
    for source, prompt, kept in posts:
        groups[source] = {"prompt": prompt, "responses": list(kept), "scores": [float(s) for s in kept.values()],
                          "pairs": [], "transformed": [(transformed_score(s, low, high), transformed_score(
                              s, low, high, released=False)) for s in kept.values()]}
    counts["min_votes"], counts["max_votes"] = low, high
    return groups, counts
