"""Runs train.py (or test.py) in this process with a real fault injected at a chosen training forward pass, or
with probes that record what the script does.

Environment (all optional):
  FAULT_AT_FORWARD=k   the k-th training forward of this rank (1-based)
  FAULT=sigusr1|sigterm|sigint|sigkill|sigstop|nan   send this process that real signal (sigstop: a hung process),
                       or make that forward's output NaN
  FAULT_RANKS=0,1      the global ranks that get the fault (default: all)
  BREAK=rng|sampler_epoch|batch_skip|stream_position  switch off one part of exact resume, for the negative
                       controls; BREAK=same_init: every rank builds its initial weights from its own seed;
                       BREAK=validation_check: a NaN validation does not stop the run
  PROBE_LOG=FILE       append a line per model forward ("RANK train|eval BATCH") and per dataset build
                       ("RANK data START END", with DATA_SECONDS of sleep inside)
  SAMPLES_LOG=FILE     append a line per training sample: "RANK CRC32" of its inputs (which samples a run trained on)
  EVAL_SECONDS=s       every forward in eval mode sleeps this long (a slow validation)
  NAN_AT_EVAL_FORWARD=k  the k-th forward in eval mode (validation) of this rank gives NaN, as NaN weights would
  ITERABLE_DATA=1      make_datasets returns IterableDatasets
  READS_LOG=FILE       write {optimizer steps done: host reads of a tensor's value} (.item() and the like, which run
                       aten._local_scalar_dense, and .tolist(); each waits for a GPU), AdamW's host-side step
                       counters aside
  SCRIPT=test          run test.py instead of train.py
  PLAIN_PRINT=1        train.py prints with plain print() (a control for the console test)
  AMP_SCALER=1         --precision 16-mixed as on CUDA: a real torch.amp.GradScaler (Fabric gives one on CUDA only;
                       on a CPU it turns 16-mixed into bf16-mixed) and a fused AdamW, which unscales in its own step
  COMPILE_BACKEND=b    torch.compile uses backend b: aot_eager (right), or half_gradients (a deliberately wrong
                       compiler: right forward, every gradient halved), on the ranks in FAULT_RANKS (default: all)

Fabric's launcher re-runs sys.argv (this file) for every extra rank, so each rank injects its own fault.
"""

import atexit
import importlib.util
import json
import os
import signal
import sys
import time
import zlib
from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
import utils.launching  # noqa: E402
import utils.resume  # noqa: E402
import utils.samplers  # noqa: E402
import utils.streaming  # noqa: E402

forwards = eval_forwards = 0


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def probe(line: str) -> None:
    if os.environ.get("PROBE_LOG"):
        with open(os.environ["PROBE_LOG"], "a") as f:
            f.write(f"{rank()} {line}\n")


def inject(module, inputs, output):
    global forwards, eval_forwards
    if os.environ.get("PROBE_LOG"):  # a model called with keywords only (model(**batch)) has no inputs[0]
        probe(f"{'train' if module.training else 'eval'} {len(inputs[0])}")
    if os.environ.get("SAMPLES_LOG") and module.training:
        with open(os.environ["SAMPLES_LOG"], "a") as f:
            f.writelines(f"{rank()} {zlib.crc32(sample.numpy().tobytes())}\n" for sample in inputs[0].cpu())
    if not module.training:
        eval_forwards += 1
        time.sleep(float(os.environ.get("EVAL_SECONDS", 0)))
        return output * float("nan") if eval_forwards == int(os.environ.get("NAN_AT_EVAL_FORWARD", 0)) else None
    forwards += 1
    ranks = os.environ.get("FAULT_RANKS")
    if forwards != int(os.environ.get("FAULT_AT_FORWARD", 0)) or (ranks and str(rank()) not in ranks.split(",")):
        return None
    fault = os.environ["FAULT"]
    if fault == "nan":
        return output * float("nan")
    os.kill(os.getpid(), {"sigusr1": signal.SIGUSR1, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT,
                         "sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP}[fault])
    return None


def half_gradients(graph, example_inputs):
    """A wrong compiler backend: the forward as traced, every gradient of the backward halved."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def backward(backward_graph, _):
        def run(args):
            return [g * 0.5 if isinstance(g, torch.Tensor) else g for g in backward_graph(*args)]

        run._boxed_call = True
        return run

    return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward), bw_compiler=backward)(graph,
                                                                                                   example_inputs)


def compile_with(backend: str):
    compile_ = torch.compile

    def compiled(model, **kwargs):
        ranks = os.environ.get("FAULT_RANKS")
        chosen = half_gradients if backend == "half_gradients" else backend
        if ranks and str(rank()) not in ranks.split(","):
            chosen = "aot_eager"
        return compile_(model, **{**kwargs, "backend": chosen})  # Fabric compiles again with the same arguments

    torch.compile = compiled


def break_resume(part: str) -> None:
    if part == "validation_check":
        train.check_validation = lambda *args: None
    sampler = utils.samplers.ResumableShuffleSampler
    original = sampler.set_position
    if part == "rng":
        utils.resume.restore_rng = lambda state: None
    elif part == "batch_skip":
        sampler.set_position = lambda self, epoch, steps_done=0: original(self, epoch, 0)
    elif part == "stream_position":  # a streamed epoch restarts from its beginning
        utils.streaming.StreamedSteps.load_state_dict = lambda self, state: None
    elif part == "sampler_epoch":  # as Fabric's own loader would: epochs counted from 0 in every new process
        first = []
        sampler.set_position = lambda self, epoch, steps_done=0: original(
            self, epoch - (first or first.append(epoch) or first)[0], steps_done)


def cuda_like_amp() -> None:
    from lightning.fabric.plugins.precision import MixedPrecision

    fabric_class, adamw = utils.launching.Fabric, torch.optim.AdamW

    def fabric(*args, precision=None, plugins=None, **kwargs):
        if precision == "16-mixed":
            scaler = torch.amp.GradScaler("cpu", init_scale=float(os.environ.get("AMP_INIT_SCALE", 2.0**16)))
            precision, plugins = None, [*(plugins or []), MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        return fabric_class(*args, precision=precision, plugins=plugins, **kwargs)

    class FusedAdamW(adamw):
        def __init__(self, *args, fused=None, **kwargs):
            super().__init__(*args, fused=True, **kwargs)

    utils.launching.Fabric, torch.optim.AdamW = fabric, FusedAdamW


def probed_datasets(cfg):
    start = time.time()
    time.sleep(float(os.environ.get("DATA_SECONDS", 0)))
    datasets = make_datasets(cfg)
    probe(f"data {start} {time.time()}")
    if os.environ.get("ITERABLE_DATA"):
        return tuple(Stream(dataset) for dataset in datasets)
    return datasets


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)


if os.environ.get("AMP_SCALER"):
    cuda_like_amp()
if os.environ.get("COMPILE_BACKEND"):
    compile_with(os.environ["COMPILE_BACKEND"])
if os.environ.get("PLAIN_PRINT"):
    train.print0 = rank_zero_only(print)
if os.environ.get("BREAK"):
    break_resume(os.environ["BREAK"])


def probed_model(cfg):
    if os.environ.get("BREAK") == "same_init":  # each rank initialises from its own seed, as without setup_model's fix
        torch.manual_seed(cfg.seed + rank())
    module = make_model(cfg)
    module.register_forward_hook(inject)  # the whole model's forward, not its parts'
    return module


make_datasets, data.make_datasets = data.make_datasets, probed_datasets  # utils/datasets.py looks it up
make_model, train.make_model, model.make_model = train.make_model, probed_model, probed_model


class CountReads(TorchDispatchMode):
    """Counts reads of tensor values by the host, by the number of optimizer steps done when each happened."""

    def __init__(self):
        super().__init__()
        self.steps, self.reads, self.counters = 0, {}, set()
        register_optimizer_step_post_hook(self.stepped)

    def stepped(self, optimizer, args, kwargs):
        self.steps += 1
        self.counters = {state["step"].data_ptr() for state in optimizer.state.values() if "step" in state}

    def count(self) -> None:
        self.reads[self.steps] = self.reads.get(self.steps, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].data_ptr() not in self.counters:
            self.count()
        return func(*args, **(kwargs or {}))


def counted_tolist(tensor):  # a CPU tensor's tolist() reads its memory without passing the dispatcher
    reads.count()
    return tolist(tensor)


if os.environ.get("READS_LOG"):
    reads, tolist, torch.Tensor.tolist = CountReads(), torch.Tensor.tolist, counted_tolist
    reads.__enter__()
    atexit.register(lambda: Path(os.environ["READS_LOG"]).write_text(json.dumps(reads.reads)))
if os.environ.get("SCRIPT") == "test":  # not runpy: it would point sys.argv[0] at the script
    spec = importlib.util.spec_from_file_location("test_script", REPO / "test.py")
    test_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_script)
    test_script.main()
else:
    with train.peer_failures_reported():  # as train.py runs main
        train.main(train.load_config(description=train.__doc__))
train.exit_run(0)
