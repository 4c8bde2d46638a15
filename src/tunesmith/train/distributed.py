"""Data parallelism over several processes, through PyTorch's own engines.

    NPROC_PER_NODE=2 tunesmith sft ...                  ms-swift's convention: the CLI re-runs itself under torchrun
    torchrun --nproc_per_node 2 -m tunesmith sft ...    the same, spelled out (multi-node: torchrun's own flags)

One process (rank) per device; NCCL on GPUs, gloo on CPU. LoRA trains under DistributedDataParallel: the frozen
base is replicated and only the adapter gradients (the parameters that require grad) are all-reduced. Full
fine-tuning trains under FSDP2: `fully_shard` on every decoder layer and on the root shards weights, gradients
and AdamW state across ranks.

train/loop.py keeps its one loop; one process is rank 0 of 1 and every method here is then the identity. With N
ranks the loop's numbers stay those of one process with the same global batch:
  - global batch = per_device_train_batch_size x gradient_accumulation_steps x N. A step's samples come from the
    same seeded permutation as in one process; rank r takes every N-th of them (samples[r::N]), so a short last
    step of an epoch still spreads over the ranks.
  - the step's loss is the mean over the supervised tokens of all ranks: the token count is all-reduced first and
    each rank backpropagates (its loss sum) x N / count. DDP and FSDP average gradients over ranks; the factor N
    turns that average into the sum, i.e. the one-process gradient. (N is a power of two in practice, so the
    multiplication is exact in floating point.)
  - every rank runs as many forward/backward passes as the busiest one (FSDP gathers each layer's weights in
    every pass, DDP needs one synchronizing backward per rank): packing may give ranks different row counts, and
    a rank can have no sample at all in the last step of an epoch, so it runs padding rows whose loss counts 0.
  - DDP all-reduces once per step (no_sync on the other backward passes; adapter gradients are small either way).
    FSDP reduce-scatters after every backward, which keeps gradients sharded (no_sync would hold full-size ones).
  - rank 0 alone logs (all-reduced loss and token counts) and writes checkpoints. FSDP weights are gathered to
    rank 0's CPU as a full state dict and saved as the usual HF folder; the sharded AdamW state is written by
    every rank through torch.distributed.checkpoint (DCP) into `optimizer/`, which reshards on load, so a full
    run resumes on any number of processes (one included). LoRA optimizer state is identical on every rank and
    saved as in one process (also resumable on any number). Each rank's RNG state is saved for exact resumes.
  - evaluation runs the whole eval set on every rank (eval sets are small; the ranks then agree on eval_loss
    and on the best checkpoint without communication).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tunesmith.data.packing import IGNORE, Row
from tunesmith.errors import UserError

OPTIMIZER_DIR = "optimizer"  # FSDP checkpoints: the DCP-sharded AdamW state, beside the HF folder's files


# -- launching ------------------------------------------------------------------------------------------------

def under_torchrun() -> bool:
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


def _env_int(name: str, default: int, least: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < least:
        raise UserError(f"{name}={raw} is not a whole number >= {least}; set it like {name}={max(least, 2)}.")
    return int(raw)


def torchrun_command(argv: list[str]) -> list[str] | None:
    """The torchrun command line NPROC_PER_NODE (and NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, as ms-swift
    reads them) ask for; None when no re-launch is due (unset, one process, or already inside torchrun)."""
    if "NPROC_PER_NODE" not in os.environ or under_torchrun():
        return None
    nproc, nnodes = _env_int("NPROC_PER_NODE", 1), _env_int("NNODES", 1)
    if nproc * nnodes == 1:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT")
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(_env_int("NODE_RANK", 0, least=0)),
                "--master_addr", addr, "--master_port", port or "29500"]
    elif port:
        cmd += ["--master_addr", addr, "--master_port", port]
    else:
        cmd += ["--standalone"]  # rendezvous on a free localhost port: several jobs on one machine never clash
    return cmd + ["-m", "tunesmith", *argv]


def relaunch_under_torchrun(argv: list[str]) -> None:
    """Replace this process by torchrun running N copies of the same command, when NPROC_PER_NODE asks for it.
    exec, not a child process: Ctrl-C, kill and the exit status reach torchrun (and its workers) directly."""
    cmd = torchrun_command(argv)
    if cmd is None:
        return
    print(f"NPROC_PER_NODE={os.environ['NPROC_PER_NODE']}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


# -- the process group ----------------------------------------------------------------------------------------

def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group when it started more than one process, and return this rank's device
    (cuda:LOCAL_RANK on GPUs). One process: nothing happens, `device` comes back unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Rank 0 alone writes checkpoints (a 7B full fine-tune: ~15 GB) and generates general-distill answers
        # while the others wait in a collective: more than NCCL's default 10 minutes must not look like a hang.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60),
                                device_id=device if device.type == "cuda" else None)
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def on_main(make):
    """make() run by rank 0 alone, its result handed to every rank (run folders, generated data)."""
    if not active():
        return make()
    box = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def padding_row() -> Row:
    """Two tokens, one supervised: a pass that touches every weight, for a rank with no row left this step."""
    return Row(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, IGNORE]]), torch.arange(2)[None], None, 1)


# -- one rank's view ------------------------------------------------------------------------------------------

class DataParallel:
    """What the training loop asks of data parallelism. Built after setup(); one process is rank 0 of 1."""

    def __init__(self, device: torch.device):
        self.device = device
        self.world = dist.get_world_size() if active() else 1
        self.rank = dist.get_rank() if active() else 0
        self.is_main = self.rank == 0
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.sharded = False  # FSDP2

    @property
    def engine(self) -> str:
        return "FSDP2" if self.sharded else "DDP" if self.ddp is not None else "single process"

    def wrap(self, model: torch.nn.Module, full: bool) -> torch.nn.Module:
        """The module forward passes go through: the model itself in one process; for LoRA its DDP wrapper;
        for full fine-tuning the model, sharded in place by fully_shard (build the optimizer after this: its
        parameters become DTensor shards)."""
        if self.world == 1:
            return model
        if full:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, lm_head
            self.sharded = True
            return model
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return self.ddp

    # -- collectives on plain numbers -------------------------------------------------------------------------
    def _reduce(self, x, op):
        if self.world == 1:
            return x
        t = torch.tensor(x, dtype=torch.int64 if isinstance(x, int) else torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.item()

    def sum(self, x):
        """x summed over ranks (ints stay exact; floats add in float64)."""
        return self._reduce(x, dist.ReduceOp.SUM)

    def max(self, x):
        return self._reduce(x, dist.ReduceOp.MAX)

    def gather(self, obj) -> list | None:
        """Every rank's obj, on every rank; None in one process."""
        if self.world == 1:
            return None
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # -- one optimizer step -----------------------------------------------------------------------------------
    def lockstep(self, rows: list[Row]):
        """(row, real, last) for each forward/backward pass of this rank's share of a step: as many passes on
        every rank, padding rows (real False) where this rank has fewer; `last` marks the gradient sync."""
        n = self.max(len(rows))
        for i in range(n):
            yield (rows[i], True, i == n - 1) if i < len(rows) else (padding_row(), False, i == n - 1)

    def grad_sync(self, last: bool):
        """Context for one forward+backward: DDP all-reduces only in the step's last one."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    # -- checkpoints ------------------------------------------------------------------------------------------
    @staticmethod
    def _reshard(model) -> None:
        """FSDP keeps the root's weights gathered after a forward until the backward ends; after an evaluation
        (no backward) the model would still hold those gathered copies in place of the shards the optimizer
        knows, and state-dict functions would not find the optimizer's parameters."""
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def unsharded(self, lm):
        """lm with weights rank 0 can write. FSDP: every rank takes part in gathering the full state dict to
        rank 0's CPU, which gets an unsharded copy of the model (the others get None); otherwise lm itself."""
        if not self.sharded:
            return lm
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from tunesmith.model.decoder import Decoder

        self._reshard(lm.model)
        state = get_model_state_dict(lm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        with torch.device("meta"):
            model = Decoder(lm.model.config)
        model.load_state_dict(state, assign=True)
        return dataclasses.replace(lm, model=model)

    def save_sharded_optimizer(self, model, optimizer, stage: Path) -> Path | None:
        """FSDP: every rank writes its AdamW shards into `stage` with DCP (rank 0 then moves the folder into the
        checkpoint); returns stage. Otherwise None: the optimizer's state_dict goes into trainer_state.pt."""
        if not self.sharded:
            return None
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self._reshard(model)
        if self.is_main:  # a leftover of a crashed save; DCP's first collective orders this before any write
            shutil.rmtree(stage, ignore_errors=True)
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=stage)
        return stage

    def load_optimizer(self, model, optimizer, ckpt: Path, state: dict | None) -> None:
        """Restore AdamW from a checkpoint: DCP shards (resharded to this run's ranks) or a plain state_dict."""
        folder = Path(ckpt) / OPTIMIZER_DIR
        if folder.is_dir():
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

            osd = get_optimizer_state_dict(model, optimizer)  # the layout to fill, this run's shards
            with warnings.catch_warnings():  # in one process DCP warns that it loads in one process: the intent
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load({"optimizer": osd}, checkpoint_id=folder)
            set_optimizer_state_dict(model, optimizer, osd)
        elif self.sharded:
            raise UserError(f"{ckpt}: this full fine-tune checkpoint was written by a single process; resume it "
                            f"with one process (without NPROC_PER_NODE / torchrun).")
        else:
            optimizer.load_state_dict(state)

    def load_model_state(self, model, load) -> None:
        """Put the weights `load()` returns (a full state dict) into the model; under FSDP rank 0 alone loads
        them and they are scattered as shards."""
        if not self.sharded:
            model.load_state_dict(load())
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, load() if self.is_main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def own(self, per_rank: list | None, default):
        """This rank's entry of a per-rank list saved by as many ranks as there are now; else `default`."""
        return per_rank[self.rank] if per_rank and len(per_rank) == self.world else default


class SilentLog:
    """The log of ranks other than 0: rank 0 writes logging.jsonl, TensorBoard, the plot and the progress line."""

    def __init__(self):
        self.records: list[dict] = []

    def log(self, step: int, values: dict) -> None:
        pass

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        pass

    def plot(self):
        return None

    def resume(self, step: int) -> None:
        pass

    def end_line(self) -> None:
        pass

    def close(self) -> None:
        pass
