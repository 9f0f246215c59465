"""The run folder, out_path/run: everything a training run changes, and the protocol that makes a run
safe to kill at any moment.

- Slots: each trained module has two files, NAME.0.safetensors and NAME.1.safetensors. The last
  committed state is in one; newer states overwrite the other (in place, through a shared mapping or
  by the background writer), so a kill mid-write tears only a slot no committed manifest names.
- Commit: once every changed module is on the disk (fsync), the state of the step (random state, data
  order, LoRA's adapter and optimizer state) goes to checkpoint.NNNNNN.pt, then one rename of the
  manifest state.json makes the step the run's last committed one. Files no committed state needs are
  removed after (older checkpoints, gradients of an interrupted step).
- Resume: --resume=1 reads the manifest, checks it was made from the same model and mode, and the run
  continues from its files and checkpoint bit for bit.
- Other files: NAME.grad[.rankN].safetensors, a module's gradient waiting on disk for the global norm
  (gradient clipping); NAME.fp32.safetensors, LoRA's fp32 copy of the frozen base (adapters.py).

A parallel run (parallel.py) shares the folder among the processes of a machine: the first one takes
the folder's lock, writes the files no mapping changes and the manifest; each updates and copies its own
rows of every weight in the shared mapped slots (own_rows); all commit a step or none does.
"""
import fcntl
import json
import shutil
from pathlib import Path

from files import fsync_path, save_tensors, write_json
from parallel import Group
from utils import UserError

MANIFEST = "state.json"
EXPORTS = ("consolidated.*.pth", "*.safetensors", "model.gguf", "adapter.pt")  # what a finished run leaves in out_path
KEPT_SUFFIXES = (".0.safetensors", ".1.safetensors", ".fp32.safetensors")  # overwritten in place, never removed


class RunFolder:
    def __init__(self, out_path, group=None):
        self.out = Path(out_path)
        self.dir = self.out / "run"
        self.group = group or Group()
        self.committed = set()  # the file names the last committed manifest names
        self.module_files = {}  # {module: its slot file name} in the last committed state
        self.written = set()  # files written since the last commit: on the disk before a manifest names them
        self.lock = None

    # --- who writes what, in a parallel run ---

    @property
    def writes(self):
        """Whether this process writes the files no shared mapping changes (the machine's first does)."""
        return self.group.local_rank == 0

    def own_rows(self, n):
        """The rows r0:r1 of n this process updates and copies in a shared mapped file."""
        part, parts = self.group.local_rank, self.group.local_world
        return n * part // parts, n * (part + 1) // parts

    # --- the files ---

    def slot(self, name):
        """The slot file a module's next state goes to: the one the last commit does not name."""
        slots = [self.dir / f"{name}.{i}.safetensors" for i in (0, 1)]
        return slots[1] if slots[0].name in self.committed else slots[0]

    def is_open_slot(self, file):
        """Whether file is a slot of this run that no committed state names: it may change in place."""
        return Path(file).parent == self.dir and Path(file).name not in self.committed

    def grad_file(self, name):
        tag = f".rank{self.group.rank}" if self.group.world > 1 else ""
        return self.dir / f"{name}.grad{tag}.safetensors"

    def base_copy_file(self, name):
        return self.dir / f"{name}.fp32.safetensors"

    def sync(self):
        """Every file written since the last commit, on the disk."""
        for file in self.written:
            fsync_path(file)
        self.written = set()

    # --- the protocol ---

    def read_manifest(self):
        """The last committed step's manifest, or None where no step was committed."""
        try:
            manifest = json.loads((self.dir / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{self.dir / MANIFEST}: cannot be read ({e}); start over with --overwrite=1")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int) or \
                not isinstance(manifest.get("files"), dict):
            raise UserError(f"{self.dir / MANIFEST}: not the manifest of a committed step; start over with --overwrite=1")
        return manifest

    def open(self, source, fingerprint, mode, resume, overwrite):
        """Take the folder for a run of mode from the model at source (with its fingerprint): never the
        source or inside it, never a folder another run uses (a lock), an earlier run kept unless
        overwrite, and with resume the run continued must be of this model and mode. Returns the manifest
        of the step to resume from, or None for a fresh start (the folder emptied)."""
        source = Path(source)
        if self.out.resolve() == source or source in self.out.resolve().parents:
            raise UserError(f"out_path={self.out} is (inside) model_path {source}, which is never written to")
        if not overwrite and not (self.dir / MANIFEST).exists() and any(p for e in EXPORTS for p in self.out.glob(e)):
            raise UserError(f"out_path={self.out} holds an exported model and no step to continue; start over "
                            "with --overwrite=1 or choose another out_path")
        self.group.agree(self.take_lock)
        previous = self.read_manifest() if self.dir.exists() else None
        if resume and previous:
            if previous["model"] != fingerprint:
                raise UserError(f"{self.dir}: this run was made from {previous['source']}, not from the model given now")
            if previous["mode"] != mode:
                raise UserError(f"{self.dir}: this run is in mode={previous['mode']}, not mode={mode}")
        elif previous and not overwrite:
            raise UserError(f"out_path={self.out} holds an earlier run; continue it with --resume=1, "
                            "start over with --overwrite=1, or choose another out_path")
        steps = set(self.group.gather(previous["step"] if resume and previous else None))
        if len(steps) > 1:
            raise UserError(f"{self.dir}: the machines of this run hold different committed steps "
                            f"({sorted(steps, key=str)}); resume needs the run folders of one step")

        def fresh():
            if not resume and self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.group.agree(fresh)  # the machine's first process, once every process has read the folder
        if not (resume and previous):
            return None
        self.module_files = previous["files"]
        self.committed = {*previous["files"].values(), previous["checkpoint"]}
        self.group.agree(lambda: self.clean(self.committed))  # what an interrupted step left behind
        return previous

    def take_lock(self):
        """Hold out_path/.lock while the run lives (the OS lets it go when the process ends): a second run
        in the same out_path, from another terminal or another torchrun, is refused."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.out / ".lock", "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.close()
            self.lock = None
            raise UserError(f"out_path={self.out}: another run is using this folder; wait for it to end or choose "
                            "another out_path")

    def commit(self, step, files, state, manifest):
        """Make step the run's last committed one. files: {module: slot file name} of the current state, all
        on the disk already (sync); state: the checkpoint's tensors and values (written by the machine's first
        process); manifest: what else state.json says. All processes call it; all commit or none."""
        checkpoint = f"checkpoint.{step:06d}.pt"
        if self.writes:
            save_tensors(state, self.dir / checkpoint)
            write_json({"step": step, "files": files, "checkpoint": checkpoint, **manifest}, self.dir / MANIFEST)
            self.clean(set(files.values()) | {checkpoint})  # the rename above was the commit
        self.group.barrier()
        self.committed, self.module_files = set(files.values()) | {checkpoint}, dict(files)

    def clean(self, keep):
        """Remove what no committed state needs: older checkpoints, temporary files, gradients of an
        interrupted step (slots and LoRA's fp32 copies of the base stay: they are overwritten in place)."""
        for f in self.dir.iterdir():
            if f.name not in keep and f.name != MANIFEST and not f.name.endswith(KEPT_SUFFIXES):
                f.unlink()
