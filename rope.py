"""Rotary position embedding: the angle of each feature pair at each position, as each family defines it
(plain, linear, llama3, yarn and longrope scaling; a theta of their own for Gemma 3's sliding layers;
partial rotary), and its application to q and k.

Pairs are adjacent features (2i, 2i+1) of a head, Meta's layout, in which slowllama holds q and k (the
Hugging Face layout's half-split pairs are permuted on reading, hf_format.py). With partial rotary only the
first rotary_dim features of each head turn; the others pass through.
"""
import math

import torch

from utils import UserError


def rope_frequencies(args, total=0, local=False):
    """(the angle per position of each feature pair, a factor on cos and sin): 1 / theta^(2i / rotary_dim),
    changed by the context-extension scaling the model was trained with, as transformers defines each.
    total: the positions of the forward pass (longrope picks its long factors past the original context);
    local: the sliding layers' rope where the model has one of their own (Gemma 3: own theta, no scaling)."""
    d = args.rotary_dim or args.head_dim
    theta = args.rope_local_theta if local and args.rope_local_theta else args.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, d, 2)[:d // 2].float() / d))
    s = {} if local and args.rope_local_theta else args.rope_scaling or {}
    kind, factor = s.get("rope_type"), s.get("factor", 1.0)
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":  # long wavelengths slowed by factor, short ones kept, a smooth blend between
        old = s["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv
        smooth = ((old / wavelength - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        return (1 - smooth) * inv / factor + smooth * inv, 1.0
    if kind == "yarn":  # interpolated (slowed) below a band of pairs, extrapolated (kept) above it
        old = s.get("original_max_position_embeddings") or args.max_seq_len

        def pair(rotations):  # the pair index that turns `rotations` times over the old context
            return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        low, high = pair(s.get("beta_fast") or 32), pair(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        ramp = ((torch.arange(d // 2).float() - low) / (high - low if high != low else 0.001)).clamp(0, 1)
        return inv / factor * ramp + inv * (1 - ramp), yarn_attention_factor(s, factor)
    if kind == "longrope":  # Phi-3: per-pair factors, the long ones for passes beyond the original context
        old = s["original_max_position_embeddings"]
        ext = torch.tensor(s["long_factor"] if total > old else s["short_factor"], dtype=torch.float32)
        return inv / ext, longrope_attention_factor(s, args.max_seq_len)
    return inv, 1.0


def yarn_attention_factor(s, factor):
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    return mscale(factor)


def longrope_attention_factor(s, max_positions):
    """longrope's factor on cos and sin: given, or sqrt(1 + ln(factor) / ln(original context)) with factor the
    context's extension (given, or max_position_embeddings over the original context)."""
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    old = s["original_max_position_embeddings"]
    factor = s.get("factor") or (max_positions or old) / old
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old))


def rope_tables(args, start, length, device, local=False, positions=None):
    """(cos, sin) of the positions start..start+length, each (length, rotary pairs), or of positions (rows,
    length) each (rows, length, rotary pairs); the factor on both."""
    total = start + length if positions is None else int(positions.max()) + 1
    inv, scale = rope_frequencies(args, total, local)
    at = torch.arange(start, start + length) if positions is None else positions
    angles = (at.float()[..., None] * inv).to(device)
    return angles.cos() * scale, angles.sin() * scale


def layer_ropes(args, start, length, device, positions=None):
    """{"full": tables, "sliding": tables, "examples": ...} of a pass over length positions from start: the
    tables of the blocks of each kind (the same where the kinds share their rope); of packed rows, positions
    (rows, length) restart at 0 where an example starts, and "examples" numbers each token's example in its row
    (attention stays within one: model.attend). Without positions, "examples" is None."""
    full = rope_tables(args, start, length, device, positions=positions)
    sliding = rope_tables(args, start, length, device, True, positions) if args.rope_local_theta else full
    examples = None if positions is None else (positions == 0).cumsum(1).to(device)
    return {"full": full, "sliding": sliding, "examples": examples}


def check_positions(args, seq_len, source):
    """Rows of seq_len tokens must lie within the positions the model was trained to read: max_position_embeddings,
    or the original context times the rope scaling's factor where that is more (Qwen's yarn is enabled without
    changing max_position_embeddings). Models that do not say (Meta's params.json) are not checked."""
    s = args.rope_scaling or {}
    scaled = int((s.get("factor") or 1.0) * s["original_max_position_embeddings"]) if \
        s.get("original_max_position_embeddings") else 0
    limit = max(args.max_seq_len or 0, scaled)
    if limit and seq_len > limit:
        raise UserError(f"--seq_len={seq_len}: {source} reads at most {limit} positions (its max_position_embeddings"
                        f"{' and rope scaling' if scaled else ''}); lower seq_len")


def longrope_switches(args, before, after):
    """Whether a longrope model's rope changes between passes over before and after positions (its factors
    switch past the original context): cached keys were turned with the other factors."""
    s = args.rope_scaling or {}
    old = s.get("original_max_position_embeddings")
    return s.get("rope_type") == "longrope" and (before > old) != (after > old)


def apply_rope(x, cos, sin):
    """Rotate each adjacent pair of features (2i, 2i+1) by its position's angle, as Meta's reference:
    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), the pair as a complex number times cos + i sin
    (one pass over x each way; four times faster than the pairs split, rotated and stacked). Features past
    the table's pairs (partial rotary) pass through."""
    turned = 2 * cos.shape[-1]
    if turned < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :turned], cos, sin), x[..., turned:]), -1)
    if x.device.type == "mps":  # complex numbers are missing on some Macs' GPUs: the same in real numbers
        return rotate_pairs(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin).unsqueeze(-2)).flatten(-2).type_as(x)


def rotate_pairs(x, cos, sin):
    """apply_rope in real numbers: x * cos + (x with each pair swapped) * (-sin, sin)."""
    cos2 = cos.repeat_interleave(2, -1).unsqueeze(-2)  # ([B,] T, 1, head_dim) against (B, T, heads, head_dim)
    sin2 = torch.stack((-sin, sin), -1).flatten(-2).unsqueeze(-2)
    xf = x.float()
    return (xf * cos2 + xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin2).type_as(x)
