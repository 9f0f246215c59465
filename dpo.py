"""Preference tuning with DPO (Rafailov et al. 2023), streamed: the sigmoid loss of the policy's and the
reference's summed log-probabilities of the chosen and rejected answers, as TRL computes it (label smoothing:
the conservative variant), the rows of a step's pairs, the reference, and the metrics TRL logs.

The reference costs no extra reads of the model: with LoRA it is the base without the adapters, run in the
same pass as the policy while each block is in memory (blackbox_model.py); with full fine-tuning (and LoRA on a
mixture of experts, whose blocks read their experts as they route), the log-probabilities of every pair are
computed once before training by streamed forward passes and kept in the run's checkpoints: a resumed run
reads them back.
"""
import hashlib

import torch
import torch.nn.functional as F

from adapters import without_adapters
from data import draw, padded
from utils import UserError

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def loss_terms(policy, reference, beta, label_smoothing):
    """(losses, chosen rewards, rejected rewards), one a pair, of the rows' summed log-probabilities (policy with
    its graph, reference without), the chosen rows first: beta times the difference of the policy's and the
    reference's log-ratios of chosen to rejected, through -log sigmoid (a share label_smoothing of the pairs
    taken as mislabelled)."""
    half = len(policy) // 2
    chosen, rejected = policy[:half] - reference[:half], policy[half:] - reference[half:]
    logits = beta * (chosen - rejected)
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses, beta * chosen.detach(), beta * rejected.detach()


class Objective:
    """DPO as a training step takes it (blackbox_model.the_turn): the loss of a micro-batch's pairs from its
    logits, and the metrics of the pairs seen since reset. reference_in_pass: the reference is the model without
    its adapters, computed in the step's own pass."""

    def __init__(self, beta, label_smoothing, reference_in_pass):
        self.beta, self.label_smoothing, self.reference_in_pass = beta, label_smoothing, reference_in_pass
        self.reset()

    def reset(self):
        self.sums, self.pairs = dict.fromkeys(("loss",) + METRICS, 0.0), 0

    def loss(self, policy, reference, pairs):
        """The sum of the micro-batch's pair losses over pairs (the step's number of pairs), with its graph; policy:
        each row's summed log-probabilities of its targets (the chosen rows first)."""
        losses, chosen, rejected = loss_terms(policy, reference.to(policy.device), self.beta, self.label_smoothing)
        half = len(policy) // 2
        for key, values in (("loss", losses.detach()), ("rewards/chosen", chosen), ("rewards/rejected", rejected),
                            ("rewards/accuracies", (chosen > rejected).float()), ("rewards/margins", chosen - rejected),
                            ("logps/chosen", policy[:half].detach()), ("logps/rejected", policy[half:].detach())):
            self.sums[key] += float(values.double().sum())
        self.pairs += half
        return losses.sum() / pairs

    def metrics(self, group=None):
        """The means of the pairs since reset (of every process of group)."""
        values = torch.tensor([*self.sums.values(), self.pairs], dtype=torch.float64)
        values = group.sum(values) if group is not None else values
        return {key: float(v) / max(1.0, float(values[-1])) for key, v in zip(self.sums, values[:-1])}


def objective_for(s, model):
    """The Objective of a run's settings (settings.Settings), or None for the cross-entropy: the reference in the
    step's pass with LoRA, but where blocks route tokens to experts."""
    if s.data.objective != "dpo":
        return None
    return Objective(s.dpo.beta, s.dpo.label_smoothing, s.mode == "lora" and not model.args.n_experts)


# --- the rows of pairs ---

def pair_rows(pairs, indices, seq_len, reference=None):
    """(x, y, None, the reference's log-probabilities or None) of pairs[indices] (data.load_data's encoded
    pairs: (ids, targets) of prompt + chosen, of prompt + rejected): the chosen rows first, then the rejected
    (TRL's order), each its last seq_len + 1 tokens (the start of a long prompt goes first), padded at the end to
    the longest row."""
    rows = [pairs[i][0] for i in indices] + [pairs[i][1] for i in indices]
    rows = [(ids[-seq_len - 1:], targets[-seq_len - 1:]) for ids, targets in rows]
    x, y = padded(rows, max(len(ids) for ids, _ in rows) - 1)
    ref = None if reference is None else torch.cat([reference[indices, 0], reference[indices, 1]])
    return x, y, None, ref


def get_pairs(pairs, data, generator, part=(0, 1), reference=None):
    """data.batch_size random pairs' rows (pair_rows); part as data.get_batch's."""
    return pair_rows(pairs, draw(len(pairs), data, generator, part), data.seq_len, reference)


def truncated(pairs, seq_len):
    """How many pairs have a row longer than seq_len + 1 tokens."""
    return sum(max(len(c[0]), len(r[0])) > seq_len + 1 for c, r in pairs)


def fingerprint(pairs, seq_len):
    """Of the pairs' tokens and targets, and of seq_len (where long pairs are cut)."""
    digest = hashlib.sha256(str(seq_len).encode())
    for chosen, rejected in pairs:
        for ids, targets in (chosen, rejected):
            digest.update(torch.tensor([len(ids), *ids, *targets]).numpy().tobytes())
    return digest.hexdigest()


# --- the reference ---

@torch.no_grad()
def reference_logps(model, pairs, data):
    """(pairs, 2): the summed log-probabilities of each pair's chosen and rejected answer by the model as it is
    now, without adapters (streamed forward passes of a step's pairs at a time)."""
    model.eval()
    out, size = [torch.zeros(0, 2)], data.batch_size  # (a micro-batch's rows: what the memory plan holds)
    with without_adapters(model):
        for start in range(0, len(pairs), size):
            x, y, _, _ = pair_rows(pairs, torch.arange(start, min(len(pairs), start + size)), data.seq_len)
            logps = model(x, y).sum(-1).float().cpu()
            out.append(logps.view(2, -1).t())
    model.train()
    return torch.cat(out)


def reference_for(model, parts, data, state, say=print):
    """The reference's log-probabilities of each list of pairs in parts (train, held-out), each computed in the
    batches an evaluation of it makes (the same rows, the same numbers), or those of a resumed run's checkpoint
    state. Returns ([tensor of each part], what a checkpoint keeps of them)."""
    key = fingerprint([pair for part in parts for pair in part], data.seq_len)
    if state is not None and "reference_logps" in state:
        if state.get("reference_data") != key:
            raise UserError("the run's data changed since it started: its reference log-probabilities are of other "
                            "pairs; resume with the data it started with, or start over with --overwrite=1")
        logps = state["reference_logps"]
    else:
        say(f"the reference's log-probabilities of {sum(map(len, parts))} pairs: streamed forward passes of "
            f"{data.batch_size} pairs")
        logps = torch.cat([reference_logps(model, part, data) for part in parts])
    cuts = torch.tensor([0, *map(len, parts)]).cumsum(0).tolist()
    return [logps[a:b] for a, b in zip(cuts, cuts[1:])], {"reference_logps": logps, "reference_data": key}


@torch.no_grad()
def evaluate(model, objective, pairs, data, reference=None):
    """The metrics of held-out pairs (reference: their log-probabilities, else the model without adapters)."""
    objective.reset()
    size = data.batch_size
    for start in range(0, len(pairs), size):
        indices = torch.arange(start, min(len(pairs), start + size))
        x, y, _, ref = pair_rows(pairs, indices, data.seq_len, reference)
        y = y.to(model.device)
        if ref is None:
            with without_adapters(model):
                ref = model(x, y).sum(-1)
        objective.loss(model(x, y).sum(-1), ref, len(pairs))
    result = objective.metrics()
    objective.reset()
    return result
