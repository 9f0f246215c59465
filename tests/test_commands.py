"""Every command the project prints works as printed: the commands of a run's report.md after short runs of
each kind (full fine-tuning and LoRA; Meta's, Hugging Face's and GGUF exports; two processes under torchrun),
and the command that continues a run."""
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT, run, run_main

SHORT = ["--iters=2", "--seq_len=16", "--batch_size=2", "--eval_period=0"]
KINDS = {"full-meta": [], "full-hf": ["--out_format=hf"], "full-gguf": ["--out_format=gguf"],
         "lora-meta": ["--mode=lora"], "lora-hf": ["--mode=lora", "--out_format=hf"],
         "lora-gguf": ["--mode=lora", "--out_format=gguf:q8_0"]}
OTHERS = {"llama-cli", "ollama", "lms"}  # llama.cpp's, Ollama's, LM Studio's: not installed here


def printed_commands(report):
    """The commands in backticks of a report."""
    return [shlex.split(c) for c in re.findall(r"`([^`]+)`", report)]


def check_commands(out, tmp_path, shell_first=True):
    """Run every python command of out/report.md (the first through a shell, as printed; the others as the
    same script and arguments in this process) and check that the other programs' commands name files that
    are there. Returns the commands."""
    commands = printed_commands((out / "report.md").read_text())
    assert commands
    for i, argv in enumerate(commands):
        if argv[0] in OTHERS:
            for arg in argv[1:]:
                if "/" in arg:
                    assert (ROOT / arg).exists(), (argv, arg)
            continue
        assert argv[0] == "python", argv
        if i == 0 and shell_first:
            printed = shlex.join(argv)
            p = subprocess.run(["bash", "-c", printed.replace("python", shlex.quote(sys.executable), 1)], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, (printed, p.stderr[-2000:])
        else:
            code, _, err = run_main(*argv[1:])
            assert code == 0, (argv, err[-2000:])
    return commands


@pytest.mark.parametrize("kind", KINDS)
def test_the_report_commands_of_each_kind_of_run(make, tmp_path, kind):
    out = tmp_path / "out"
    code, stdout, err = run_main("finetune.py", f"--model_path={make(seed=71)}", f"--out_path={out}",
                                 f"--offload_path={tmp_path}/off", *SHORT, *KINDS[kind])
    assert code == 0, err
    commands = check_commands(out, tmp_path, shell_first=kind == "full-meta")
    programs = {argv[0] if argv[0] != "python" else argv[1] for argv in commands}
    if kind.endswith("gguf"):  # the runtimes that read GGUF today, and Ollama's Modelfile
        assert OTHERS <= programs and (out / "Modelfile").read_text() == "FROM ./model.gguf\n"
    else:
        assert "test_gen.py" in programs
    if kind.startswith("lora"):  # the adapter on its base model, and merged into it
        assert {"test_gen.py", "merge_lora.py"} <= programs
    assert (out / "report.md").read_text() in stdout


def test_the_chat_command_is_printed_only_for_a_chat_model(make, tmp_path):
    model = make(seed=72)  # no chat template, not Meta's Llama 3 tokenizer
    code, _, err = run_main("finetune.py", f"--model_path={model}", f"--out_path={tmp_path}/out",
                            f"--offload_path={tmp_path}/off", *SHORT)
    assert code == 0, err
    assert "--chat" not in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_two_processes_print_commands_that_work(make, tmp_path):
    """A run of two processes (torchrun): its report's commands, and the command that continues it, which
    starts the two processes again."""
    import finetune
    from parallel import Group
    model, out = make(seed=73), tmp_path / "out"
    args = [f"--model_path={model}", f"--out_path={out}", f"--offload_path={tmp_path}/off", *SHORT,
            "--compute_dtype=float32", "--dist_timeout=60"]
    code, _, err = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune.py", *args)
    assert code == 0, err
    check_commands(out, tmp_path)
    argv = sys.argv
    sys.argv = ["finetune.py", *args, "--iters=3"]
    try:
        resume = finetune.resume_command(Group(world=2, local_world=2))
    finally:
        sys.argv = argv
    assert resume.startswith("torchrun --standalone --nproc_per_node=2 finetune.py") and "--resume=1" in resume
    p = subprocess.run(["bash", "-c", resume.replace("torchrun", f"{shlex.quote(sys.executable)} -m torch.distributed.run",
                                                     1)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"resuming {out / 'run'} from step 2" in p.stdout
