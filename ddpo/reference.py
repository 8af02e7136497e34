"""The reference model of DPO/DDPO and the packing check: what the policy is compared with, and whether packed rows
give the log-probs of padded ones.

Reference log-probs come from a frozen copy of the starting model (fp32 weights under the policy's autocast, so the
same model gives the same log-probs), from the policy itself with its LoRA adapters switched off, or, after
`Reference.precompute`, from a disk cache under $DDPO_CACHE/ref_logps keyed by a digest of the model files' bytes,
the dtype and every pair's token ids.
"""

import hashlib
import json
import os
import pickle

import torch
from tqdm import tqdm

from ddpo.data import DataError, collate, collate_packed, make_batch
from ddpo.files import torch_save, written
from ddpo.distributed import print0, shard
from ddpo.lora import adapters_disabled
from ddpo.models import SequenceLogps, cache_dir, disable_dropout, files_digest, load_model, use_segment_attention


class Reference:
    """Reference log-probs of (chosen, rejected): a frozen model run in the policy's layout, or, after
    `precompute`, values computed once for every pair and cached on disk under $DDPO_CACHE/ref_logps."""

    def __init__(self, logps, lora=False):
        self.logps, self.cached, self.lora = logps, None, lora  # logps: a SequenceLogps module

    @torch.no_grad()
    def __call__(self, batch, index):
        if self.cached is not None:
            return self.cached[index].to(batch.input_ids.device).unbind(-1)
        if self.lora:  # the policy itself, adapters off: the base weights, no second copy
            with adapters_disabled(self.logps.model):
                logps, _ = self.logps(batch)
        else:
            logps, _ = self.logps(batch)
        return logps.chunk(2)

    def precompute(self, cfg, pairs, pad_token_id, device, autocast_dtype=None, save=True):
        """Log-probs of every pair once, cached under a key of the model files' bytes, the dtype the run computes in
        (not --dtype auto, which resolves per machine) and every pair's token ids."""
        key = hashlib.sha256(json.dumps({"files": files_digest(cfg.ref_model or cfg.model),
                                         "dtype": str(autocast_dtype or torch.float32),
                                         "pairs": [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]}
                                        ).encode()).hexdigest()[:20]
        path = os.path.join(cache_dir(), "ref_logps", key + ".pt")
        if os.path.exists(path):
            self.cached = read_cache(path, len(pairs))
            print0(f"reference log-probs: reused {path}", flush=True)
        else:
            rows = []
            for i in tqdm(range(0, len(pairs), cfg.batch_size), desc="reference log-probs", dynamic_ncols=True):
                chunk = pairs[i:i + cfg.batch_size]
                batch = make_batch(chunk, pad_token_id, device, cfg.packing, share_prompts=self.logps.share_prompts)
                rows.append(torch.stack(self(batch, None), -1).float().cpu())
            self.cached = torch.cat(rows)  # (P, 2)
            if save:
                with written(path) as tmp:
                    torch_save(self.cached, tmp)
                print0(f"reference log-probs: computed and cached in {path}", flush=True)
        self.logps = None  # the frozen copy is no longer needed


def read_cache(path, n_pairs):
    """The cached reference log-probs (n_pairs, 2) at `path`; a DataError for a file that is not that (truncated,
    another shape, not written by ddpo)."""
    try:
        cached = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        cached = e
    if not (isinstance(cached, torch.Tensor) and cached.shape == (n_pairs, 2) and cached.dtype == torch.float32):
        raise DataError(f"{path}: not a reference cache of these {n_pairs} pairs (truncated, or not written by ddpo); "
                        "remove it, and it is computed again")
    return cached


def load_reference(cfg, policy_logps, device, world):
    """The reference of a loss that has one: the policy with its adapters off (LoRA without --ref-model), else a
    frozen copy of --ref-model or --model (the starting model, also when resuming) in the policy's layout: fp32
    weights (the policy's under the same autocast), the policy's attention and head, sharded under --fsdp."""
    if cfg.lora_r and not cfg.ref_model:
        return Reference(policy_logps, lora=True)
    model = load_model(cfg.ref_model or cfg.model, torch.float32, torch.device("cpu") if cfg.fsdp else device)
    disable_dropout(model.eval().requires_grad_(False))
    ref_logps = SequenceLogps(model, policy_logps.use_triton)
    if cfg.fsdp:
        shard(ref_logps, device, world)
    return Reference(ref_logps)


def check_packing(cfg, policy_logps, ref, pairs, pad_token_id, device, rejected=True):
    """Switch the policy (and a frozen reference) to segment attention where it fits (models.use_segment_attention),
    where pairs with a rejected completion then share their prompt in packed rows (when both switched: the reference
    takes the policy's batches); then compare each model's packed log-probs on the first pairs with padded ones under
    its own attention, once: packing needs the model to honour position ids as sequence boundaries."""
    sample = pairs[:2]
    checked = [(cfg.model, policy_logps)] + ([(cfg.ref_model or cfg.model, ref.logps)] if ref and not ref.lora else [])
    with torch.no_grad():
        padded = [m(collate(sample, pad_token_id, rejected).to(device))[0] for _, m in checked]
        switched = [use_segment_attention(m.model) for _, m in checked]
        for _, m in checked:
            m.share_prompts = rejected and all(switched)
        batch = collate_packed(sample, rejected, policy_logps.share_prompts).to(device)
        packed = [m(batch)[0] for _, m in checked]
    for (name, _), a, b in zip(checked, padded, packed):
        if not (a.isfinite().all() and b.isfinite().all()):
            raise SystemExit(f"error: {name} gives non-finite log-probs on the first pairs: its logits overflow")
        if not torch.allclose(a, b, rtol=1e-3, atol=1e-2):
            raise SystemExit(f"packed and padded log-probs differ on {name} ({b.tolist()} vs {a.tolist()}): "
                             "this model does not separate packed sequences; pass --no-packing")
