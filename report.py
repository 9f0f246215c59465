"""The record of a fine-tuning run: out_path/metrics.jsonl (a line per step and per evaluation,
matching the committed run), out_path/loss.png, out_path/report.md, and the progress shown while
it runs (a tqdm bar on a terminal, a line per step otherwise)."""
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch

import gguf_source
from files import write_text
from plot import draw_run, read_metrics, smooth, smoothing_window
from utils import duration, gb, proc_io

IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes")
HERE = Path(__file__).resolve().parent


class RunLog:
    """out_path/metrics.jsonl holds one JSON object a line, each flushed as it is written:
    {"kind": "run", "step", the model and settings} where a run starts or resumes; per step {"kind":
    "train", "step", "loss", "lr", "tokens" (trained so far), "tokens_per_s", "seconds" (the step's),
    "elapsed" (seconds of the run so far, across resumes), "time", "grad_norm" (the global gradient norm,
    where grad_clip makes it known)}; per evaluation {"kind": "eval", "step", "val_loss" and "perplexity"
    (with validation data), "completion", "seconds", ...}. Where /proc/self/io exists every record also
    has this process's bytes since the record before: rchar / wchar (all read()/write() calls, the page
    cache included), read_bytes / write_bytes (what the disk served / was given). On resume the records
    after the committed step are dropped, so the file always matches the committed run.
    out_path/loss.png is drawn from it at each evaluation and at the end; report.md sums it up at the end.
    Progress: one tqdm bar on a terminal, else the line per step."""

    def __init__(self, s, out, model, step, processes=1):
        """s: the run's settings (settings.Settings)."""
        self.s, self.out, self.path, self.processes = s, out, out / "metrics.jsonl", processes
        self.tokens_per_step = processes * s.data.micro_batch_tokens * s.data.grad_accum  # of every process
        final_eval_again = step >= s.iters  # a finished run resumed: its final evaluation runs again
        self.records = [r for r in read_metrics(self.path) if step and r["step"] <= step
                        and not (final_eval_again and r.get("kind") == "eval" and r["step"] == step)]
        write_text("".join(json.dumps(r) + "\n" for r in self.records), self.path)
        self.file = open(self.path, "a")
        self.has_io = Path("/proc/self/io").exists()
        self.io_mark, self.start = proc_io(), time.time()
        self.elapsed_before = max((r.get("elapsed", 0.0) for r in self.records), default=0.0)
        self.tokens = max((r.get("tokens", 0) for r in self.records if r.get("kind") == "train"), default=0)
        self.bar, self.plot_failed = None, False
        self.write({"kind": "run", "step": step, "model": Path(model.manifest["source"]).name,
                    "source": model.manifest["source"], "compute_dtype": str(model.compute_dtype).removeprefix("torch."),
                    "resumed": bool(step), "processes": processes, "mode": s.mode, "optimizer": s.optim.kind,
                    "lr": s.optim.lr, "batch_size": s.data.batch_size, "seq_len": s.data.seq_len,
                    "grad_accum": s.data.grad_accum, "iters": s.iters, "lora_rank": s.lora.rank,
                    "lora_targets": ",".join(s.lora.targets), "grad_clip": s.optim.grad_clip,
                    "data_path": s.data.path, "device": s.device})
        if sys.stdout.isatty() and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=s.iters, initial=step, unit="step", dynamic_ncols=True, desc="training")

    def write(self, record):
        now = time.time()
        record.setdefault("elapsed", round(self.elapsed_before + now - self.start, 3))
        record.setdefault("time", round(now, 3))
        if self.has_io:
            io = proc_io()
            record.update({key: io[key] - self.io_mark[key] for key in IO_KEYS})
            self.io_mark = io
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def say(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, model, step, loss, lr, seconds, left):
        self.tokens += self.tokens_per_step
        record = {"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens": self.tokens,
                  "tokens_per_s": round(self.tokens_per_step / seconds, 3), "seconds": round(seconds, 4)}
        norms = model.optimizer.grad_norms
        if norms:  # per-weight norms, kept when grad_clip is set: the global norm is their norm
            record["grad_norm"] = torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).item()
        if model.router_loss is not None:  # a mixture's load-balancing loss (without its coef), of this process
            record["router_aux_loss"] = model.router_loss
        metrics = model.objective.metrics(model.group) if model.objective else {}  # DPO's, of every process
        record.update({k: v for k, v in metrics.items() if k != "loss"})
        self.write(record)
        accuracy = f" | accuracy {metrics['rewards/accuracies']:.2f}" if metrics else ""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.4f}{accuracy}, {self.tokens_per_step / seconds:.0f} tok/s",
                                     refresh=True)
        else:
            print(f"step {step}/{self.s.iters} | loss {loss:.4f}{accuracy} | {self.tokens_per_step / seconds:.0f} tok/s | "
                  f"{seconds:.2f} s/step | {left:.0f} s left", flush=True)

    def evaluation(self, step, result, seconds):
        self.write({"kind": "eval", "step": step, **result, "seconds": round(seconds, 3)})
        self.plot()

    def plot(self):
        """out_path/loss.png; without matplotlib the run goes on, saying so once."""
        try:
            draw_run(self.out, label=f"out_path={self.s.out_path}")
        except Exception as e:  # a picture is not worth a run: it goes on
            if not self.plot_failed:
                hint = " (pip install matplotlib)" if isinstance(e, ImportError) else ""
                self.say(f"loss.png not drawn: {type(e).__name__}: {e}{hint}")
            self.plot_failed = True

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self):
        self.close_bar()
        self.file.close()

    def finish(self, source, chat):
        """At the end of a run: loss.png, and a short report, printed and written as out_path/report.md.
        source: the base model's folder; chat: whether the model has a chat format."""
        self.close()
        self.plot()
        text = self.report(source, chat)
        write_text(text, self.out / "report.md")
        print(text.rstrip("\n"), flush=True)

    def report(self, source, chat):
        s = self.s
        train = [r for r in self.records if r.get("kind") == "train"]
        evals = [r for r in self.records if r.get("kind") == "eval"]
        out = Path(s.out_path)
        tail = proc_io()  # the export's bytes, after the last record
        io = {key: sum(r.get(key, 0) for r in self.records) + (tail[key] - self.io_mark[key]) * self.has_io
              for key in IO_KEYS}
        step_s = sum(r["seconds"] for r in train)
        run = [r for r in self.records if r.get("kind") == "run"][-1]
        lines = [f"# slowllama run: {out}", "",
                 f"{run['model']}, mode={s.mode}, optimizer={s.optim.kind}, lr={s.optim.lr:g}, "
                 f"{f'{self.processes}x' if self.processes > 1 else ''}{s.data.batch_size}x{s.data.seq_len}"
                 f"{f'x{s.data.grad_accum}' if s.data.grad_accum > 1 else ''} "
                 f"{'tokens' if s.data.objective != 'dpo' else 'pairs x tokens (DPO)'} a step, "
                 f"compute {run['compute_dtype']} on {s.device}", ""]
        if train:
            elapsed = max(r.get("elapsed", 0.0) for r in self.records)
            tail_mean = smooth([r["loss"] for r in train], smoothing_window(len(train)))[-1]
            lines += [f"- trained: {len(train)} steps, {train[-1]['tokens']:,} tokens in {duration(elapsed)} "
                      f"({duration(step_s)} in steps: {train[-1]['tokens'] / max(step_s, 1e-9):.1f} tokens/s on average)",
                      f"- loss: {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f} (step {train[0]['step']} -> "
                      f"{train[-1]['step']}; the mean of the last {smoothing_window(len(train)) // 2 + 1}: {tail_mean:.4f})"]
        with_val = [r for r in evals if "val_loss" in r]
        if with_val:
            first, last = with_val[0], with_val[-1]
            also = f"perplexity {first['perplexity']:.1f} -> {last['perplexity']:.1f}" if "perplexity" in last else \
                f"preference accuracy {first['rewards/accuracies']:.3f} -> {last['rewards/accuracies']:.3f}"  # DPO
            lines.append(f"- val loss: {first['val_loss']:.4f} -> {last['val_loss']:.4f} (step {first['step']} -> "
                         f"{last['step']}; {also})")
        if evals:
            lines.append(f"- last completion: {evals[-1]['completion']!r}")
        if self.has_io:
            lines.append(f"- bytes: read {gb(io['rchar'])} and wrote {gb(io['wchar'])} (read()/write(), the page cache "
                         f"included); the disk served {gb(io['read_bytes'])} and was given {gb(io['write_bytes'])}")
        skip = {"run", "metrics.jsonl", "loss.png", "report.md"}
        exported = sorted(f.name for f in out.iterdir() if f.name not in skip and not f.name.startswith("."))
        lines += [f"- model: {out}/ ({', '.join(exported)})",
                  f"- loss plot: {out / 'loss.png'}; metrics: {out / 'metrics.jsonl'}",
                  *how_to_run(out, source, s.export[0] or "gguf" * (out / "model.gguf").exists(), s.mode == "lora", chat)]
        return "\n".join(lines) + "\n"


def command(program, *args):
    """A command line as a shell takes it: a script of this project as `python SCRIPT` (its path from the
    current folder), the arguments quoted where they need it."""
    if program.endswith(".py"):
        program = f"python {shlex.quote(os.path.relpath(HERE / program))}"
    return " ".join([program, *(shlex.quote(str(a)) for a in args)])


def how_to_run(out, source, layout, lora, chat):
    """The lines of report.md saying how to run the result, each command in backticks and working as
    printed from the folder the run was started in: test_gen.py on a Meta or Hugging Face export; the
    commands of llama.cpp, Ollama and LM Studio on a GGUF one (out_path/Modelfile is Ollama's); a LoRA
    run's adapter alone on its base model, merged, and in PEFT's layout."""
    chat_flag = ["--chat"] if chat else []
    if layout != "gguf":
        lines = [f"- run it: `{command('test_gen.py', out)}`"
                 + (f" (a chat: `{command('test_gen.py', out, '--chat')}`)" if chat else "")]
    else:
        gguf, name = out / "model.gguf", re.sub(r"[^a-z0-9._-]+", "-", out.resolve().name.lower()).strip("-.") or "slowllama"
        lines = [f"- run it (GGUF) in llama.cpp: `{command('llama-cli', '-m', gguf, *(['-cnv'] if chat else []))}`; "
                 f"in Ollama: `{command('ollama', 'create', name, '-f', out / 'Modelfile')}` then "
                 f"`{command('ollama', 'run', name)}`; in LM Studio: `{command('lms', 'import', gguf)}`"]
    if lora:
        adapter = out / "adapter.pt"
        lines.append(f"- the adapter alone: {adapter}, on its base model: "
                     f"`{command('test_gen.py', source, '--lora', adapter, *chat_flag)}`; merged into it: "
                     f"`{command('merge_lora.py', source, adapter, out / 'merged')}`; for PEFT: {out / 'peft'}")
        if layout == "gguf" and (out / "adapter.gguf").exists() and gguf_source.is_gguf(source):
            lines.append(f"- the GGUF adapter on the GGUF it was trained on: "
                         f"`{command('llama-cli', '-m', source, '--lora', out / 'adapter.gguf')}`")
        elif layout == "gguf" and (out / "adapter.gguf").exists():
            base = out / "base-gguf"
            lines.append(f"- the GGUF adapter on the base model's GGUF: `{command('loader.py', source, base, '--out_format', 'gguf')}` "
                         f"then `{command('llama-cli', '-m', base / 'model.gguf', '--lora', out / 'adapter.gguf')}`")
    return lines
