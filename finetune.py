"""Fine-tune a language model that does not fit in memory, streaming its modules from disk.

python finetune.py [--name=value ...]   (the settings below; with none, the built-in default model
learns the bundled slowllama.txt; --debug=1 shows Python tracebacks). The run lives in out_path: run/
holds the working weights, optimizer state and committed steps (run_folder.py; continue with
--resume=1); at the end the model is exported there in the source's layout (or out_format's), ready
for python test_gen.py out_path.
torchrun --nproc_per_node=N finetune.py [--name=value ...]: N processes (GPUs, or CPU processes) train
one model, each on batch_size of every step's N x batch_size rows (parallel.py; README).
"""
model_path = ""  # a model folder in Meta's or Hugging Face's layout, a .gguf file (or ollama:NAME[:TAG]); empty: the built-in default model
data_path = ""  # a text file, a folder of them, a .pt file of token ids, or rows in JSON, JSON lines or Parquet: conversations, instructions (Alpaca's too), ShareGPT, preference pairs (README); empty: slowllama.txt
pack = 1  # 1: examples packed into rows, each attending only to itself (positions restart); 0: one example a row, padded
prompt_template = ""  # prompt/response data: the text before each response; empty: the model's chat template, else Llama 2's "[INST] {prompt} [/INST]"
system_template = "<<SYS>>\n{system}\n<</SYS>>\n\n"  # prompt/response data with prompt_template: put before the prompt when an example has a system text
out_path = "out"  # the run's folder: working state in out_path/run, the exported model in out_path
out_format = ""  # layout of the exported model: meta, hf or gguf (out_path/model.gguf for llama.cpp, Ollama, LM Studio, f16; gguf:q8_0, gguf:bf16, gguf:f32 for other types; LoRA runs add adapter.gguf); empty: the source's
offload_path = ""  # where converted models are kept (one folder per source model); empty: ./offload
device = "cpu"  # cpu, cuda or mps
compute_dtype = "auto"  # auto: bfloat16 matmuls (fp32 master weights) where the device has native bf16, else float32
memory_budget = -1.0  # GiB of RAM the run plans for (kept activations, resident modules), per process under torchrun; -1: half the RAM (shared among a machine's processes)
keep_activations = 1  # 1: keep each block's activations for the backward pass (within the budget); 0: recompute
seed = 1337  # seeds the data order, dropout and LoRA initialisation
iters = 500  # optimizer steps
seq_len = 64  # tokens per row
batch_size = 16  # rows per micro-batch
grad_accum = 1  # micro-batches per optimizer step
lr = 3e-3  # learning rate (real 7B-70B models: about 1e-5 for full fine-tuning, 1e-4 for LoRA)
warmup_iters = 0  # linear warm-up steps; 0: none
lr_decay = 0  # 1: cosine decay from lr to min_lr over iters
min_lr = 0.0  # the learning rate at the end of the cosine decay
optimizer = "adamw"  # sgd or adamw
weight_decay = 0.01  # AdamW's decoupled weight decay, on every parameter
beta1 = 0.9  # AdamW
beta2 = 0.999  # AdamW
eps = 1e-8  # AdamW
grad_clip = 0.0  # clip the global gradient norm to this; 0: off
dropout = 0.0  # dropout on the output of attention and feed-forward in every block
router_aux_loss_coef = 0.0  # a mixture of experts: the load-balancing loss times this joins the loss (transformers' router_aux_loss_coef with output_router_logits); 0: off, as the published configs have it
mode = "full"  # full: update every weight; lora: train low-rank adapters, the base is only read
objective = "sft"  # sft: the cross-entropy of the targets; dpo: preference tuning on pairs (prompt, chosen, rejected) against the model as it starts (dpo.py)
dpo_beta = 0.1  # DPO: how far the policy may move from the reference (TRL's beta)
dpo_label_smoothing = 0.0  # DPO: the share of pairs taken as mislabelled (conservative DPO); 0: plain DPO
lora_rank = 8  # LoRA
lora_alpha = 16.0  # LoRA: the adapter's output is scaled by lora_alpha / lora_rank
lora_dropout = 0.05  # LoRA: dropout on the adapter's input
lora_targets = "wq,wv"  # LoRA: weights that get adapters, of wq wk wv wo w1 w2 w3 output (comma-separated)
base_quant = "none"  # LoRA: the frozen base as the source stores it (none; a GGUF's block formats in fp32), a GGUF's own quantized tensors (source), or quantized at conversion (q8_0, q4_0); README
base_copy = -1  # LoRA in fp32 on the CPU from a bf16/f16 model: 1 keeps an fp32 copy of the base in out_path/run (mapped at every read, not converted; removed at the end), 0 converts at every read, -1: 1 when it fits in the page cache and on the disk
val_fraction = -1.0  # the tail of the data held out for a validation loss; 0: none; -1: a tenth of the pairs with objective=dpo, else none
eval_period = 100  # every this many steps: validation loss and a completion of prompt; 0: never
prompt = "The basic problem is one of size."  # completed greedily at each evaluation and at the end
gen_tokens = 24  # tokens to generate for the completion
save_period = 10  # commit the run every this many steps (and at the end, and on Ctrl-C)
resume = 0  # 1: continue the run in out_path from its last committed step
overwrite = 0  # 1: start over even if out_path holds an earlier run
plan = 0  # 1: measure this machine for a few seconds, print the run's time, memory and disk writes, exit (plan.py)
plan_mb = 512  # --plan=1: MB of the temporary file the disk is measured with
dist_timeout = 7200  # torchrun: seconds a process waits for the others (an evaluation on the first one) before stopping

DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and type(v) in (int, float, str)}

import errno
import math
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

import hf_format as hf
import parallel
import settings as settings_module
from adapters import add_lora, adapted_params, adapter_state, drop_base_copy, read_adapter
import dpo
from data import eval_rows, get_batch, load_data, packs_examples
from files import load_tensors, save_tensors, write_text
from memory_plan import graph_bytes_per_token
from loader import check_export, load_model, log_line, save_model
from chat import chat_format
from report import RunLog, command
from rope import check_positions
from run_folder import RunFolder
from utils import UserError, check_disk, gb, get_rng_state, main_guard, mount_point, set_rng_state


def settings(*argv, **overrides):
    """The typed settings (settings.Settings) of --name=value arguments and name=value overrides, over the
    defaults above: for scripts and tests that run the pieces of a run themselves."""
    return settings_module.parse([*argv, *(f"--{k}={v}" for k, v in overrides.items())], DEFAULTS)


def disk_needs(model, s):
    """What the run will write: the run folder (two slot files of every module's fp32 working copy and
    optimizer state; adapter checkpoints for LoRA), gradients waiting for clipping, the export."""
    out = Path(s.out_path)
    n = sum(box.numel() for box in model.boxes.values())
    if s.mode == "full":
        run = 2 * n * 4 * (3 if s.optim.kind == "adamw" else 1) + (n * 4 if s.optim.grad_clip else 0)
        run -= sum(f.stat().st_size for f in (out / "run").glob("*.safetensors")) if s.resume else 0
    else:  # two checkpoints of A, B and their AdamW moments
        run = 2 * 3 * 4 * s.lora.rank * adapted_params(model, s.lora.targets)
    export = sum(math.prod(box.shapes[k]) * model.storage_dtype.itemsize for box in model.boxes.values()
                 for k in box.shapes)
    return [("run folder", out / "run", max(0, run)), ("export", out, export)]


def evaluate(model, s, val, step, say=print, reference=None):
    """The validation loss (where data is held out; DPO: the loss and TRL's metrics of the held-out pairs,
    reference: their reference log-probabilities, if computed before) and a greedy completion of prompt:
    printed, and returned as {val_loss, perplexity or DPO's metrics, completion}."""
    model.eval()
    parts, result = [], {}
    if s.data.objective == "dpo" and val:
        metrics = dpo.evaluate(model, model.objective, val, s.data, reference)
        result.update(val_loss=metrics.pop("loss"), **metrics)
        parts.append(f"val loss {result['val_loss']:.4f}, accuracy {result['rewards/accuracies']:.3f}, "
                     f"margin {result['rewards/margins']:.3f}")
    elif s.data.objective != "dpo" and len(val.tokens) > 1:
        x, y, positions = eval_rows(val, s.data, 8 * s.data.batch_size)
        size = s.data.batch_size  # rows of a micro-batch: what the memory plan holds
        loss = sum(model(x[r:r + size], y[r:r + size], positions=None if positions is None else positions[r:r + size])
                   .sum() for r in range(0, len(x), size)) / -max(1, int((y != -1).sum()))
        result.update(val_loss=loss.item(), perplexity=math.exp(min(loss.item(), 700)))
        parts.append(f"val loss {loss.item():.4f}")
    prompt_ids = model.tokenizer.encode(s.prompt)
    completion = model.generate(prompt_ids, s.gen_tokens, stop_ids=model.tokenizer.stop_ids)
    result["completion"] = model.tokenizer.decode(prompt_ids + completion)
    say(f"step {step}: {' | '.join(parts + [repr(result['completion'])])}")
    model.train()
    return result


# --- committed steps: the run folder's protocol is in run_folder.py; here, what a step's state is ---

def commit(model, s, run, step, data_rng, kept=None):
    """Make the current state the run's last committed step: every process flushes its modules, then the
    checkpoint (every process's random state, the data order, LoRA's adapter and optimizer state) and the
    manifest are written and the step is committed (RunFolder.commit). kept: what else the checkpoint holds (DPO's
    reference log-probabilities)."""
    group = run.group
    files = model.flush()
    rngs = group.gather(get_rng_state(model.device))  # once every process has flushed
    group.check_same(model.optimizer.checksums, step)
    state = {"step": step, "rng": rngs[group.rank], "data_rng": data_rng.get_state(), **(kept or {})}
    if group.world > 1:
        state["rngs"] = rngs
    if s.mode == "lora":  # the adapter checkpoint: adapter, settings, optimizer state, step, RNG
        state.update(adapter_state(model, s.lora), optimizer=model.optimizer.adapter_optimizer.state_dict())
    run.commit(step, files, state, {"model": model.manifest["fingerprint"], "source": model.manifest["source"],
                                    "mode": s.mode, "processes": group.world})


def start_training(model, s, run, previous, data_rng):
    """Set the model up for training: from scratch, or from the run's last committed step (weights and
    optimizer state, adapters, random state, data order). Returns (the step to continue from, the checkpoint's
    state or None)."""
    group, state = run.group, None
    if previous:
        checkpoint = run.dir / previous["checkpoint"]
        state = read_adapter(checkpoint, model, s.lora) if s.mode == "lora" else load_tensors(checkpoint, mmap=False)
    if s.mode == "lora":
        add_lora(model, s.lora, s.seed, tensors=state["tensors"] if state else None)
    model.setup_training(run, s.mode, s.optim, s.data.micro_batch_tokens, s.data.grad_accum, s.keep_activations,
                         s.base_copy, disk_needs(model, s)[0][2], log_line)
    if not previous:
        return 0, None
    rngs = state.get("rngs", [state["rng"]])
    if previous.get("processes", 1) != group.world and group.rank == 0:
        print(f"{run.dir}: a run of {previous.get('processes', 1)} processes continued by {group.world}: the same "
              "data order, not the same rows per step")
    set_rng_state(rngs[group.rank] if group.rank < len(rngs) else state["rng"], model.device)
    data_rng.set_state(state["data_rng"])
    if s.mode == "lora":
        model.optimizer.adapter_optimizer.load_state_dict(state["optimizer"])
    print(f"resuming {run.dir} from step {previous['step']}")
    return previous["step"], state


def resume_command(group):
    """The command that continues this run from its last committed step, as it was launched."""
    args = [a for a in sys.argv[1:] if not a.startswith("--resume")] + ["--resume=1"]
    if group.world == 1:
        return command("finetune.py", *args)
    script = os.path.relpath(Path(__file__).resolve())
    if group.world == group.local_world:  # one machine
        return command("torchrun", "--standalone", f"--nproc_per_node={group.local_world}", script, *args)
    return f"torchrun (with the options each machine was launched with) {shlex.join([script, *args])}"


def disk_full(model, s, run, error):
    """The one line for a disk that filled during the run: the folder, its disk, what the run needs there,
    the committed step and the command that continues it."""
    needs = sum(n for _, _, n in disk_needs(model, s))
    committed = run.read_manifest()
    writing = f" writing {Path(error.filename).name}" if error.filename else ""
    return UserError(f"{run.dir}: its disk ({mount_point(run.dir)}, {gb(shutil.disk_usage(run.dir).free)} free) is full"
                     f"{writing}; this run needs up to {gb(needs)} in {run.out}; it stays at its last committed step "
                     f"{committed['step'] if committed else 0}; free some space and continue with: "
                     f"{resume_command(run.group)}")


class StopRequest:
    """Ctrl-C finishes the current step, commits it and stops; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once, losing it)", file=sys.stderr, flush=True)


def main():
    s = settings_module.parse(sys.argv[1:], DEFAULTS)
    if s.plan:  # nothing is written: plan.py
        from plan import plan as make_plan
        make_plan(s, disk_needs)
        return
    group, device = parallel.start(s.device, s.dist_timeout)
    try:
        train(s, group, device)
        group.barrier()  # the others wait for the first process's export: all leave the group together
    except BaseException:
        group.close()
        raise
    if group.world > 1:  # gloo's threads can abort the interpreter's teardown ("terminate called without an
        sys.stdout.flush()  # active exception", about one run in twenty): everything is written and synced
        sys.stderr.flush()  # by now, so the process leaves without it
        os._exit(0)


def train(s, group, device):
    first = group.rank == 0  # evaluates, logs and exports
    torch.manual_seed(s.seed + group.rank)  # dropout differs between processes; LoRA's start does not
    model = load_model(s.model_path or None, offload_path=s.offload_path or None, device=device,
                       compute_dtype=s.compute_dtype, memory_budget=s.memory_budget_bytes(group.local_world),
                       dropout=s.dropout, log=log_line if group.local_rank == 0 else lambda *_: None,
                       base_quant=s.base_quant)
    check_export(model, *s.export, output_adapter=s.mode == "lora" and "output" in s.lora.targets)  # before training
    check_positions(model.args, s.data.seq_len, model.manifest["source"])
    if s.router_aux_loss_coef and not model.args.n_experts:
        raise UserError(f"--router_aux_loss_coef={s.router_aux_loss_coef}: {model.manifest['source']} is not a mixture "
                        "of experts (it has no router)")
    model.router.coef = s.router_aux_loss_coef
    train_data, val_data = load_data(s.data, model.tokenizer, model.offload_dir, s.data.objective,
                                     log_line if first else lambda *_: None)
    model.packed_rows = packs_examples(s.data)
    if s.data.objective == "dpo":
        model.objective = dpo.objective_for(s, model)
        cut = dpo.truncated(train_data + val_data, s.data.seq_len)
        if cut and first:
            log_line(f"{cut} pairs are longer than seq_len + 1 = {s.data.seq_len + 1} tokens: their rows keep their "
                     "last tokens (the start of the prompt is cut)")
    if group.local_rank == 0:
        check_disk(disk_needs(model, s), log_line)
    run = RunFolder(s.out_path, group)
    previous = run.open(model.manifest["source"], model.manifest["fingerprint"], s.mode, s.resume, s.overwrite)
    data_rng = torch.Generator().manual_seed(s.seed)
    step, state = start_training(model, s, run, previous, data_rng)
    reference, kept = (None, None), None
    if model.objective and not model.objective.reference_in_pass:
        reference, kept = dpo.reference_for(model, (train_data, val_data), s.data, state,
                                            log_line if first else lambda *_: None)
    if first:
        plan = model.memory
        tokens = s.data.micro_batch_tokens
        graph = tokens * graph_bytes_per_token(model.args, model.compute_dtype, s.data.seq_len, tokens=tokens)
        spilled = model.args.n_layers - plan.kept_inputs
        log_line(f"RAM: about {gb(plan.peak)} at peak{' per process' if group.local_world > 1 else ''} "
                 f"({len(plan.resident)} of {len(model.boxes)} modules resident, activations of "
                 f"{min(model.args.n_layers, plan.graph_budget // (graph * s.data.grad_accum))} blocks kept"
                 f"{f', inputs of {spilled} blocks on disk through a step' if spilled else ''})")
        if group.world > 1:
            log_line(f"{group.world} processes, {group.local_world} on this machine: {group.world * s.data.batch_size} "
                     f"rows a micro-batch")
    try:
        loop(model, s, run, step, data_rng, train_data, val_data, reference, kept)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise disk_full(model, s, run, e) from e


def loop(model, s, run, step, data_rng, train_data, val_data, reference=(None, None), kept=None):
    """The steps from step to s.iters, their evaluations and commits; then (the first process) the export.
    train_data, val_data: Streams, or DPO's pairs with their reference log-probabilities (reference) where they
    were computed before training (kept: what the checkpoints keep of them)."""
    group = run.group
    first = group.rank == 0
    stop = StopRequest()
    run_log = RunLog(s, run.out, model, step, group.world) if first else None
    model.train()

    def evaluation(step):
        if first:
            eval_start = time.time()
            result = evaluate(model, s, val_data, step, run_log.say, reference[1])
            run_log.evaluation(step, result, time.time() - eval_start)
            for box in model.boxes.values():  # a module it let go is on the disk before the others read it
                box.wait_write()

    if step == 0 and s.eval_period:
        evaluation(step)
    start, first_step = time.time(), step
    while step < s.iters:
        part = (group.rank, group.world)
        batches = [dpo.get_pairs(train_data, s.data, data_rng, part, reference[0]) if model.objective else
                   get_batch(train_data, s.data, data_rng, part) for _ in range(s.data.grad_accum)]
        step_start = time.time()
        try:
            loss = model.train_step(batches, s.optim.lr_at(step + 1, s.iters))
        except FloatingPointError as e:
            raise UserError(f"step {step + 1}: {e}; nothing of this step was committed (the run stays at its last "
                            "committed step); try a lower lr or grad_clip")
        step += 1
        elapsed = time.time() - step_start
        left = (time.time() - start) / (step - first_step) * (s.iters - step)
        if first:
            run_log.step(model, step, loss, s.optim.lr_at(step, s.iters), elapsed, left)
        elif model.objective:
            model.objective.metrics(group)  # (a sum over the processes: each takes part)
        if s.eval_period and step % s.eval_period == 0 and step < s.iters:
            evaluation(step)
        stopping = bool(group.sum(torch.tensor(int(stop.requested))))  # every process stops at the same step
        if step % s.save_period == 0 or step == s.iters or stopping:
            commit(model, s, run, step, data_rng, kept)
        if stopping:
            if first:
                run_log.close()
                print(f"stopped at step {step}; continue with: {resume_command(group)}", file=sys.stderr)
            model.close()
            group.barrier()  # all leave the group together
            sys.exit(130)
    if not first:  # the first process evaluates and exports; the first of each other machine removes its copy
        drop_base_copy(model, model.base_files)
        model.close()
        return
    run_log.close_bar()
    if s.eval_period:
        evaluation(step)
    model.eval()
    drop_base_copy(model, model.base_files)
    export(model, s, run.out, step)
    model.close()
    run_log.finish(model.manifest["source"], has_chat_format(model))


def has_chat_format(model):
    try:
        chat_format(model.offload_dir, model.tokenizer)
        return True
    except UserError:
        return False


def export(model, s, out, step):
    """The trained model into out in the layout asked (LoRA: also the adapter alone, as adapter.pt, in PEFT's
    layout and, with a GGUF export, as adapter.gguf)."""
    layout, gguf_type = s.export
    layout = layout or model.manifest.get("layout")  # (a GGUF source: a GGUF, and the adapter for it)
    if s.mode == "lora":
        save_tensors({**adapter_state(model, s.lora), "step": step}, out / "adapter.pt")
        hf.write_peft(out / "peft", model, s.lora, base_name=model.manifest["source"], log=log_line)
    save_model(model, out, out_format=layout, gguf_type=gguf_type)
    if layout == "gguf":
        write_text("FROM ./model.gguf\n", out / "Modelfile")  # Ollama's: ollama create NAME -f out/Modelfile
    if s.mode == "lora" and layout == "gguf":  # the adapter alone, for the base model's GGUF
        import gguf_format
        gguf_format.write_adapter(model, out / gguf_format.ADAPTER_FILE, s.lora.alpha, log_line)


if __name__ == "__main__":
    main_guard(main)
