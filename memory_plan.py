"""The memory plan: how a process's memory budget is shared out between what a step must hold, the blocks'
activations kept for the backward pass, the next module read ahead, and the modules that stay resident."""
import math
from dataclasses import dataclass

import torch

import chunked
from files import WINDOW_BYTES
from head import HEAD_CHUNK_BYTES, chunk_tokens
from model import module_shapes

CHUNK_BYTES = 32 << 20  # gradients are computed and applied in blocks of rows of about this size
PROCESS_BYTES = 340 << 20  # Python, torch and its thread pools' buffers, with room for what allocations round
# up to (bench.py's peaks against its plans check it)


def graph_bytes_per_token(args, dtype, row_tokens=0, packed=True, tokens=0):
    """What autograd keeps of one block per token: the residual stream and the norms' inputs in fp32 (two
    norms more in Gemma's sandwich, q and k norms'), the inputs to matmuls, attention and the gated MLP in the
    compute dtype, and a tenth more for what allocations round up to (tests/test_model.py holds it against
    what autograd saves of a block of each family). Of rows of row_tokens: the mask of a sliding window or of
    packed examples (packed: where rows may hold several), and attention with capped logits (Gemma 2),
    computed whole: three (heads x row_tokens) matrices a token. A long micro-batch (of tokens; default
    row_tokens: chunked.py) keeps attention's graph alone (not in a mixture: its sparse blocks run whole)."""
    attention = 2 * (args.n_heads + args.kv_heads) * args.head_dim
    norms = (5 + 4 * (args.norms == "sandwich")) * args.dim + 2 * (args.n_heads + args.kv_heads) * args.head_dim * \
        bool(args.qk_norm)  # the q and k norms' inputs and outputs, in fp32
    capped = 3 * args.n_heads * row_tokens if args.attn_softcap else 0
    mask = row_tokens if packed or args.sliding_window else 0  # a mask, in fp32
    if chunked.long_micro_batch(tokens or row_tokens, args, dtype) and not args.n_experts:  # attention's graph
        return ((mask + args.n_heads) * 4 + attention * torch.finfo(dtype).bits // 8) * 11 // 10
    return ((norms + mask) * 4 + (attention + 3 * args.hidden_dim + capped) * torch.finfo(dtype).bits // 8) * 11 // 10


def block_bytes(args, dtype, tokens, trainable, packed=False):
    """A block's forward and backward over a micro-batch of tokens: its graph and the gradients at its input; run
    whole, the backward's gradients of the MLP's activations; in chunks (chunked.py), the gradients at
    attention's output, queries, keys and values, a chunk's activations and their gradients, and the weights'
    gradients summed over the chunks (trainable)."""
    graph = tokens * graph_bytes_per_token(args, dtype, tokens, packed)
    if not chunked.long_micro_batch(tokens, args, dtype) or args.n_experts:  # whole: the backward's gradients at
        return graph + tokens * (4 * args.dim + 2 * args.hidden_dim * dtype.itemsize)  # the input and the MLP's
    return graph + tokens * (4 * args.dim + (3 * args.n_heads + 2 * args.kv_heads) * args.head_dim *
                             dtype.itemsize) + 5 * chunked.CHUNK_BYTES + 4 * sum(
        math.prod(s) for s in module_shapes(args, "layers.0").values()) * trainable


@dataclass(frozen=True)
class MemoryPlan:
    graph_budget: int  # bytes of blocks' activations kept for the backward pass
    prefetch_in_memory: bool  # the next module is read into memory ahead of its use (else into the page cache)
    prefetch: int  # bytes that reading ahead into memory adds to the peak
    peak: int  # the planned peak of the process, bytes
    resident: frozenset  # names of the modules that stay in memory
    kept_inputs: int  # blocks whose inputs stay in memory through a step (the last ones; the others' are spilled)


def plan_memory(args, embeddings, layers, norm, output, budget, tokens, micro_batches=1, whole_grads=False,
                keep_activations=True, reads_from_disk=False, reference_in_pass=False, cache_tokens=0, packed=True):
    """Share the memory budget (bytes, the whole process) out. Always needed: a block (of a mixture: with two
    of its experts, whatever the number chosen) and the embeddings or output beside it (at the turns of the
    step both are in memory), the gradient rows being applied
    (a whole module's gradient when gradients accumulate, wait for clipping or come from two uses of
    one table: whole_grads), each block's input, a chunk of the head's logits and their gradient
    (head.py), the block being computed (of a long micro-batch: a chunk at a time, chunked.py). Where the
    blocks' inputs do not fit beside the rest, the first blocks' wait on disk through the step (spill.py).
    Then, in order of what they save: blocks' activations (a quarter of a block's arithmetic each),
    reading the next module into memory ahead of its use (else the OS reads it ahead), and the last
    modules staying resident (the final norm always: it is tiny and used at every turn). Where the reads
    come from the disk, past the page cache (reads_from_disk), reading ahead comes first: nothing else
    reads ahead, and every module read while the step waits costs its read. DPO's reference in the pass
    (reference_in_pass) holds one more input a micro-batch and its logits at the turn. Generation of cache_tokens
    (the prompt and what is generated) holds their keys and values, and the prompt's pass a block's activations.
    packed: rows may hold several examples (attention's mask)."""
    modules = list(dict.fromkeys([embeddings, *layers, output]))  # the output may be the embeddings
    experts = [box.experts.boxes[0] for box in layers if box.experts]  # a mixture: an expert in use, the next
    block = max((box.memory_bytes() for box in layers), default=0) + \
        2 * max((e.memory_bytes() for e in experts), default=0)  # read ahead
    big = max(embeddings.memory_bytes(), output.memory_bytes())
    grads = 0 if not embeddings.trainable else \
        4 * max(box.numel() for box in modules) if whole_grads else CHUNK_BYTES
    all_tokens = tokens * micro_batches  # tokens: of one micro-batch
    cdt = embeddings.compute_dtype.itemsize
    # a chunk of the head: its logits, their fp32 copy, their gradient (capped logits keep two more: Gemma 2), or
    # a block of the output's rows from the logits of every token; and each token's normed input and gradient
    chunk = min(tokens, chunk_tokens(args))
    head = max((3 + 2 * bool(args.final_softcap)) * chunk * args.vocab_size * 4, 2 * HEAD_CHUNK_BYTES * (tokens > chunk)) + \
        tokens * (args.dim * (cdt + 4 + 4 * args.tied) + 16)  # (tied: the inputs again in the table's fp32)
    per_token = graph_bytes_per_token(args, embeddings.compute_dtype, tokens, packed)  # (a row of every token: an
    # upper bound of attention written out)
    # the block being computed (its activations and their gradients) and the window a converting read maps
    working = block_bytes(args, embeddings.compute_dtype, tokens, layers[0].trainable, packed) + WINDOW_BYTES
    if cache_tokens:  # keys and values of every block; the prompt's pass: its input, output and a block's work
        working += cache_tokens * (2 * args.n_layers * args.kv_heads * args.head_dim * cdt + 8 * args.dim) + \
            block_bytes(args, embeddings.compute_dtype, cache_tokens, False)
    # the turn of the step (the last block kept, the output, the head), then the blocks' backward (the output let go)
    fixed = PROCESS_BYTES + block + grads + max(big + head, working)
    # the blocks' inputs (DPO's reference in the pass: one more) and the gradient at a block's outputs; where they
    # do not fit, the first blocks' wait on disk (spill.py): in the forward pass the kept ones, the block's input
    # being written and its output; in the backward, a spilled one in use, the next one read ahead, the gradient
    one_input = all_tokens * args.dim * 4
    kept_inputs = args.n_layers
    if tokens and fixed + (args.n_layers + 1 + reference_in_pass) * one_input > budget:
        kept_inputs = max(1, min(args.n_layers, (budget - fixed) // one_input - 2 - reference_in_pass))
    spilled = kept_inputs < args.n_layers
    inputs = ((max(kept_inputs + 2, 3) if spilled else kept_inputs + 1) + reference_in_pass) * one_input
    needed = fixed + inputs
    # reading ahead: the next module (a block, or the output after the last one) beside the block in use and
    # its work, in the forward and the backward passes (at the turn, the last block is already in fixed)
    prefetch = max(0, max(block, big) + working - max(big + head, working))
    graphs = args.n_layers * all_tokens * per_token
    prefetch_in_memory = reads_from_disk and budget - needed >= prefetch
    graph_budget = max(0, min(budget - needed - prefetch * prefetch_in_memory, graphs if keep_activations else 0))
    free = budget - needed - graph_budget - prefetch * prefetch_in_memory
    if not prefetch_in_memory:
        prefetch_in_memory = free >= prefetch
        free -= prefetch * prefetch_in_memory
    resident = {norm.name}
    for box in reversed(modules):  # residents are the last modules: those in use at the turn of the step
        if box.resident_bytes() > free:
            break
        resident.add(box.name)
        free -= box.resident_bytes()
    peak = needed + graph_budget + prefetch * prefetch_in_memory + sum(box.resident_bytes() for box in modules
                                                                       if box.name in resident)
    return MemoryPlan(graph_budget, prefetch_in_memory, prefetch, peak, frozenset(resident), kept_inputs)
