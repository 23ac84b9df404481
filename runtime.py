"""How a command runs: its main() (usage, one-line errors, exit codes, also under torchrun), the processes (torchrun's
environment or one), the device and precision, and files written whole (a temporary name, renamed when complete).

Reading order: run_main -> setup_distributed, to_device -> precision -> write_dir / write_atomic
"""

import importlib
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.distributed as dist

from config import UserError, convert, warn

# -----------------------------------------------------------------------------
# main(): usage, errors, exit codes

def run_main(argv, usage: str, work) -> int:
    """The main() of every script: usage on no arguments or -h; a UserError is printed as `error: ...` and exits 2
    (no traceback: it is the user's to fix); Ctrl-C before a loop takes the signal over exits 130.

    Under torchrun the job prints a mistake once. One found before the process group starts (a config value) is
    found by every rank: rank 0 prints it. One found later (rank 0 preparing the data, or every rank at a non-finite
    loss) is counted in the process group's store: the first rank to count it prints it. A rank whose collective
    then fails because that peer exited (any exception, within a few seconds of the count) exits 2 without a word."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("NEOBERT_DEBUG")
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(usage, file=sys.stdout if argv else sys.stderr, flush=True)
            return 0 if argv else 2
        work(argv)
    except BrokenPipeError:  # `python train.py -h | head`: the reader left; say nothing more, not even at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as e:
        if debug:
            raise
        count = _count_errors(1)
        if count == 1 or (count is None and int(os.environ.get("RANK", 0)) == 0):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        if debug or _JOB.get("store") is None or not _peer_reported():
            raise
        return 2  # a peer stopped with its error (printed there), taking this rank's collective down
    return 0


_JOB = {}  # the torchrun job's store (setup_distributed), kept past destroy_process_group for run_main


def _count_errors(add: int) -> Optional[int]:
    """The job's count of ranks that stopped on a UserError, after adding `add`; None before a process group."""
    if _JOB.get("store") is None:
        return None
    try:
        return _JOB["store"].add("neobert/user_errors", add)
    except Exception:  # the store went with the process that held it
        return None


def _peer_reported(seconds: float = 5.0) -> bool:
    """Whether another rank stops on a UserError within `seconds` (it may still be on its way to count it)."""
    for _ in range(int(seconds / 0.2)):
        if _count_errors(0):
            return True
        time.sleep(0.2)
    return False


# -----------------------------------------------------------------------------
# processes and devices

def setup_distributed(backend: Optional[str] = None, timeout=None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment, or (0, 1, cuda:0 | cpu) for one process. Under torchrun
    the process group is started: nccl on GPUs and gloo on CPU, unless `backend` says otherwise (evaluate.py's
    processes run their own tasks and need only gloo barriers, with a long `timeout`)."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        # torch._dynamo imported after the group exists (DDP imports it) keeps the group alive past
        # destroy_process_group; its gloo threads then free the last collectives' tensors while the interpreter
        # shuts down, and the process aborts ("terminate called without an active exception", 1 exit in ~40)
        importlib.import_module("torch._dynamo")
        dist.init_process_group(backend, **({"timeout": timeout} if timeout is not None else {}))
        _JOB["store"] = dist.distributed_c10d._get_default_store()  # run_main's error count (no public handle)
    return rank, world_size, device


def to_device(batch: dict, device) -> dict:
    """A batch's tensors on the device (non-blocking: loaders pin their batches on CUDA); other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def host_to_device(value: float, device) -> torch.Tensor:
    """A host number as a float32 scalar on the device, copied from pinned memory: the host does not wait for it."""
    t = torch.tensor(float(value))
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


def write_dir(final: Path, write) -> None:
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():  # the same step written again (a resumed run passing it): swap, never leave a gap
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """A file written under a temporary name, then renamed: never seen half-written."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)



# -----------------------------------------------------------------------------
# precision: bf16 autocast where the hardware has bf16 units, fp32 elsewhere (weights and optimizer stay fp32)

def cpu_flags(cpuinfo="/proc/cpuinfo") -> set:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS: then fp32 is chosen)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    return {w for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
            for w in line.split(":", 1)[-1].split()}


def resolve_precision(mixed_precision: str, device, warn=warn) -> str:
    """trainer.mixed_precision (auto | bf16 | no) on this device -> "bf16" or "no". auto: bf16 on CUDA and on CPUs
    with native bf16 (AVX512-BF16, AMX), fp32 otherwise: emulated bf16 is hundreds of times slower than fp32."""
    convert(mixed_precision, Literal["auto", "bf16", "no"], "trainer.mixed_precision")
    device_type = torch.device(device).type
    native = device_type == "cuda"
    if device_type == "cpu":  # torch's capability is the kernel family (AVX2, AVX512, SVE256, ...), not whether bf16
        # units exist; the feature flags say (x86 AVX512-BF16 / AMX, aarch64 BF16). Either naming bf16/AMX is enough.
        capability = torch.backends.cpu.get_cpu_capability().upper()
        native = "BF16" in capability or "AMX" in capability or bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    if mixed_precision == "auto":
        return "bf16" if native else "no"
    if mixed_precision == "bf16" and device_type == "cpu" and not native and warn is not None:
        warn("trainer.mixed_precision=bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): expect it to be "
             "hundreds of times slower than fp32 (2048^3 matmul on an AVX2 CPU: 0.27 GFLOP/s bf16, 98 fp32); "
             "use auto or no")
    return mixed_precision


def autocast(device, precision: str):
    """bf16 autocast for precision "bf16", else a no-op context."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()
