"""Training features of modern recipes: LR schedules, best checkpoint, early stopping, step-based runs, fine-tuning
from weights, the gradient norm."""

import csv
import math

import pytest
import torch
from conftest import assert_one_error_line, checkpoints, load, max_weight_diff, only_run, run_script, workload
from test_resume import identical

from config import parse_config
from utils.checkpoint import top_k_name
from utils.early_stopping import follow_validation
from utils.lr_schedule import lr_at

ARGS = ["--accelerator", "cpu", "--logger_name", "csv"]
EPOCH = workload().steps_per_epoch  # optimizer steps per epoch (19 for the digits)


def train(root, *args, driver=False, **kwargs):
    return run_script("tests/fault_driver.py" if driver else "train.py", "--root_dir", root, *ARGS, *args, **kwargs)


def rows(run):
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


# -- LR schedule -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,mid", [("cosine", 0.55), ("linear", 0.55), ("exponential", math.sqrt(0.1)),
                                          ("constant", 1.0)])
def test_lr_at_chosen_steps(schedule, mid):
    """10 warmup steps, then decay over steps 10..110 to 0.1 x peak; `mid` is the fraction of the peak at step 60."""
    def lr(step):
        return lr_at(step, 2.0, 10, 110, schedule, 0.1)

    assert lr(1) == pytest.approx(0.2)  # warmup starts at peak / warmup_steps
    assert lr(10) == 2.0  # and reaches the peak at step warmup_steps
    assert lr(60) == pytest.approx(2.0 * mid)
    assert lr(110) == pytest.approx(2.0 if schedule == "constant" else 0.2)  # min_lr_ratio x peak at the last step
    assert lr(11) < 2.0 or schedule == "constant"


# -- step-based runs, exact resume mid-epoch, the same LR on any world size ------------------------------------------

STEPS = ["--max_steps", "30", "--val_every_n_steps", "7", "--checkpoint_every_n_steps", "10", "--log_every_n_steps",
         "1", "--warmup_steps", "4", "--num_checkpoint_keep", "10"]


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    train(root, *STEPS)
    return only_run(root)


@pytest.mark.slow
def test_max_steps_run_validates_and_checkpoints_on_its_own_steps(step_run):
    logged = rows(step_run)
    assert [int(r["step"]) for r in logged] == list(range(1, 31))  # ends mid-epoch (2 for the digits)
    assert [int(r["step"]) for r in logged if r["val_loss"]] == [7, 14, 21, 28, 30]
    assert [load(p)["global_step"] for p in checkpoints(step_run)] == [10, 20, 30]
    assert [float(r["lr"]) for r in logged] == [lr_at(s, 0.002, 4, 30, "cosine", 0.1) for s in range(1, 31)]
    assert load(checkpoints(step_run)[-1])["finished"] and all(float(r["grad_norm"]) > 0 for r in logged)


@pytest.mark.slow
def test_max_steps_resume_from_a_mid_epoch_checkpoint_is_exact(step_run, tmp_path):
    """SIGKILL at step 25; the resume starts from the mid-epoch checkpoint at step 20 and ends bit-identical, with
    the same logged rows and LR at every step."""
    train(tmp_path, *STEPS, driver=True, env={"FAULT": "sigkill", "FAULT_AT_FORWARD": "25"}, check_rc=-9)
    run = only_run(tmp_path)
    result = train(tmp_path, *STEPS, "--resume", run)
    assert "at step 20" in result.stdout
    assert identical(load(checkpoints(run)[-1]), load(checkpoints(step_run)[-1]))

    def without_speed(run):
        return [{k: v for k, v in r.items() if k != "samples_per_sec"} for r in rows(run)]

    assert without_speed(run) == without_speed(step_run)


@pytest.mark.slow
def test_two_processes_use_the_same_lr_at_every_step(step_run, tmp_path):
    train(tmp_path, *STEPS, "--devices", "2")
    assert [r["lr"] for r in rows(only_run(tmp_path))] == [r["lr"] for r in rows(step_run)]


# -- best checkpoint and early stopping ------------------------------------------------------------------------------

@pytest.mark.slow
def test_best_checkpoint_follows_the_monitor_and_survives_retention_and_resume(tmp_path):
    root = tmp_path / "runs"
    train(root, "--epochs", "3", "--monitor", "val_loss", "--num_checkpoint_keep", "1")  # the mode follows: min
    run = only_run(root)
    losses = {int(r["step"]): float(r["val_loss"]) for r in rows(run) if r["val_loss"]}
    best_step = min(losses, key=lambda step: (losses[step], step))  # the first of the lowest
    best = load(run / "checkpoints" / "best.ckpt")
    assert (best["global_step"], best["best_value"]) == (best_step, losses[best_step])
    assert [p.name for p in checkpoints(run)] == [f"epoch-0003-step-{3 * EPOCH:08d}.ckpt"]  # retention spared best

    # a resume that makes things worse (a huge LR) keeps the best of before: the best value was restored
    train(root, "--resume", run, "--epochs", "4", "--base_lr", "5", "--grad_clip", "1e9")
    assert float(rows(run)[-1]["val_loss"]) > losses[best_step]
    assert load(run / "checkpoints" / "best.ckpt")["global_step"] == best_step

    # test.py takes best by default, last or a file on request
    last = f"epoch-0004-step-{4 * EPOCH:08d}.ckpt"
    assert "best.ckpt" in run_script("test.py", "--out_dir", run).stdout
    assert last in run_script("test.py", "--out_dir", run, "--checkpoint", "last").stdout
    (run / "checkpoints" / "best.ckpt").unlink()
    assert last in run_script("test.py", "--out_dir", run).stdout
    assert_one_error_line(run_script("test.py", "--out_dir", run, "--checkpoint", "best", check_rc=2),
                          "checkpoint='best'", "no best checkpoint")


EARLY = ["--epochs", "10", "--early_stop_patience", "2", "--early_stop_min_delta", "1000"]  # no validation beats the
STOPS_AT = 3 * EPOCH  # first by 1000: stop at the third


@pytest.mark.slow
def test_early_stopping_stops_every_rank_and_counts_across_a_resume(tmp_path):
    result = train(tmp_path / "straight", *EARLY, "--devices", "2")
    run = only_run(tmp_path / "straight")
    assert f"early stop at step {STOPS_AT}: val_loss beat" in result.stdout
    assert "by no more than 1000.0 in 2 validation(s)" in result.stdout
    final = load(checkpoints(run)[-1])
    assert final["global_step"] == STOPS_AT and final["finished"] and final["bad_validations"] == 2
    assert [r["stopped_early"] for r in rows(run) if r["stopped_early"]] == ["1"]
    assert rows(run)[-1]["step"] == str(STOPS_AT)
    # best.ckpt follows strict improvements, not only those larger than min_delta
    losses = {int(r["step"]): float(r["val_loss"]) for r in rows(run) if r["val_loss"]}
    assert load(run / "checkpoints" / "best.ckpt")["best_value"] == min(losses.values())

    # stopped by a signal after the second validation (one bad one counted), the resume counts on
    train(tmp_path / "resumed", *EARLY, driver=True, env={"FAULT": "sigusr1", "FAULT_AT_FORWARD": str(2 * EPOCH + 2)},
          check_rc=143)
    stopped = only_run(tmp_path / "resumed")
    assert load(checkpoints(stopped)[-1])["bad_validations"] == 1
    train(tmp_path / "resumed", *EARLY, "--resume", "auto")
    assert load(checkpoints(stopped)[-1])["global_step"] == STOPS_AT
    result = train(tmp_path / "resumed", *EARLY, "--resume", "auto")  # finished: auto starts a new run ...
    assert len(list((tmp_path / "resumed").iterdir())) == 2
    result = train(tmp_path / "resumed", *EARLY, "--resume", stopped)  # ... and naming it trains nothing
    assert f"stopped early at step {STOPS_AT}; nothing to train" in result.stdout


def early_stop_after(values, patience, min_delta, follow=follow_validation):
    """The validation (1-based) at which early stopping stops, or None, for validation losses `values`."""
    best = reference = None
    bad = 0
    for index, value in enumerate(values, 1):
        _, best, reference, bad = follow(value, "min", best, reference, bad, min_delta)
        if bad >= patience:
            return index
    return None


def test_early_stopping_counts_steady_progress_against_a_fixed_reference():
    """The losses of the run that stopped on a new best: each gained less than min_delta over the one before, but
    0.0424 beats 0.0603 by 0.018. As in Lightning's and Keras' EarlyStopping, it is progress."""
    losses = [0.0603, 0.0516, 0.0424]
    assert early_stop_after(losses, patience=2, min_delta=0.01) is None
    assert follow_validation(0.0424, "min", 0.0516, 0.0603, 1, 0.01) == (True, 0.0424, 0.0424, 0)
    assert early_stop_after([*losses, 0.0400, 0.0390], patience=2, min_delta=0.01) == 5  # two small gains: stop
    assert early_stop_after([0.5, 0.6, 0.7], patience=2, min_delta=0.0) == 3  # worse twice: stop
    assert follow_validation(0.9, "max", 0.8, 0.8, 0, 0.0) == (True, 0.9, 0.9, 0)  # max: higher is better

    def moving_reference(value, better, best, reference, bad, min_delta):  # the rule of before: a negative control
        improved, best, reference, bad = follow_validation(value, better, best, reference, bad, min_delta)
        return improved, best, best, bad

    assert early_stop_after(losses, patience=2, min_delta=0.01, follow=moving_reference) == 3


# -- fine-tuning from weights ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_init_from_a_checkpoint_or_a_state_dict(step_run, tmp_path):
    source = checkpoints(step_run)[-1]
    weights = load(source)["model"]
    plain, last = tmp_path / "weights.pt", list(weights)[-1]
    torch.save({k: v for k, v in weights.items() if k != last}, plain)  # a plain state_dict, one key short

    # an LR of 1e-12 and no weight decay: the weights after one step are the loaded ones
    tiny = ["--max_steps", "1", "--base_lr", "1e-12", "--weight_decay", "0"]
    for path, missing in ((source, "none"), (plain, f"['{last}']")):
        root = tmp_path / path.stem
        result = train(root, *tiny, "--init_from", path)
        assert f"missing keys: {missing}; unexpected keys: none" in result.stdout
        final = load(checkpoints(only_run(root))[-1])
        assert final["global_step"] == 1 and final["optimizer"]["state"][0]["step"] == 1  # a new run, fresh optimizer
        shared = {k: v for k, v in final["model"].items() if k != last}
        assert max_weight_diff(shared, {k: weights[k] for k in shared}) < 1e-6

    # a resume does not apply init_from again; init_from with --resume is refused
    run = only_run(tmp_path / plain.stem)
    result = train(run.parent, *tiny, "--max_steps", "2", "--resume", run)
    assert "tensors loaded" not in result.stdout and "at step 1" in result.stdout
    result = train(run.parent, "--resume", run, "--init_from", plain, check_rc=2)
    assert_one_error_line(result, f"init_from='{plain}'", "cannot be given with resume")

    # the wrappings users bring: Lightning's {"state_dict": ...} and DDP's "module." prefix
    wrapped = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3}, wrapped)
    result = train(tmp_path / "wrapped", *tiny, "--init_from", wrapped)
    tensors = workload().tensors
    assert f"{tensors} of the model's {tensors} tensors loaded (unwrapped the 'state_dict' entry and the 'module.' " \
        "prefix)" in result.stdout
    final = load(checkpoints(only_run(tmp_path / "wrapped"))[-1])["model"]
    assert max_weight_diff(final, weights) < 1e-6
    # keys that match nothing load nothing: refused, not a run from random weights that claims a fine-tune
    unrelated = tmp_path / "unrelated.pt"
    torch.save({f"encoder.{k}": v for k, v in weights.items()}, unrelated)
    result = train(tmp_path / "unrelated", "--init_from", unrelated, check_rc=2)
    first, shape = workload().first_tensor, workload().first_shape
    assert_one_error_line(result, f"init_from='{unrelated}'", f"loads none of the model's {tensors} tensors",
                          f"'encoder.{first}'")
    assert not (tmp_path / "unrelated").exists()  # nothing written

    wrong = tmp_path / "wrong.pt"
    torch.save({**weights, first: torch.zeros(shape[0] + 1, *shape[1:])}, wrong)
    result = train(tmp_path / "wrong", "--init_from", wrong, check_rc=2)
    assert_one_error_line(result, f"'{first}' has shape {(shape[0] + 1, *shape[1:])}", str(shape))
    assert not (tmp_path / "wrong").exists()  # nothing written


# -- bad input that needs the data -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_warmup_longer_than_an_epoch_based_run(tmp_path):
    result = train(tmp_path, "--epochs", "1", "--warmup_steps", str(EPOCH), check_rc=2)
    assert_one_error_line(result, f"warmup_steps={EPOCH}", f"fewer than the run's {EPOCH} steps")
    assert list(tmp_path.iterdir()) == []


# -- activation checkpointing ----------------------------------------------------------------------------------------

def gradients(cfg, recompute: bool) -> list:
    """The gradients of one training_step of the copy's model at 64-true, with or without recomputing each
    sharding unit's activations in the backward."""
    from torch.utils._pytree import tree_map_only
    from torch.utils.data import default_collate

    from data import make_datasets
    from model import make_model, sharding_units
    from train import step_loss
    from utils.model_setup import recompute_in_backward

    torch.manual_seed(0)
    model = make_model(cfg).double()
    if recompute:
        for unit in sharding_units(model) or [model]:
            recompute_in_backward(unit)
    batch = default_collate([make_datasets(cfg)[0][i] for i in range(8)])
    batch = tree_map_only(torch.Tensor, lambda t: t.double() if t.is_floating_point() else t, batch)
    torch.manual_seed(1)  # the dropout masks
    step_loss(model, batch, cfg).backward()
    return [p.grad for p in model.parameters()]


def test_activation_checkpointing_gives_the_same_gradients():
    """Bit-identical at 64-true with dropout on (the recomputed forward draws the same masks)."""
    cfg = parse_config(["--dropout", "0.3"])
    assert all(torch.equal(a, b) for a, b in zip(gradients(cfg, False), gradients(cfg, True), strict=True))


@pytest.mark.slow
def test_activation_checkpointing_trains_as_without_under_fsdp2(tmp_path):
    """2 fsdp2 processes at 64-true with dropout: the same final weights with and without it."""
    args = ["--devices", "2", "--strategy", "fsdp2", "--precision", "64-true", "--dropout", "0.3", "--max_steps",
            "3", "--val_every_n_steps", "3"]
    for name, extra in (("plain", []), ("recomputed", ["--activation_checkpointing"])):
        train(tmp_path / name, *args, *extra)
    a, b = (load(checkpoints(only_run(tmp_path / name))[-1] / "meta.pt") for name in ("plain", "recomputed"))
    assert a["global_step"] == b["global_step"] == 3
    shards = [sorted((tmp_path / name).glob("*/checkpoints/epoch-*/*.distcp")) for name in ("plain", "recomputed")]
    assert [p.read_bytes() for p in shards[0]] == [p.read_bytes() for p in shards[1]] != []


@pytest.mark.slow
def test_the_k_best_checkpoints_survive_retention_a_resume_and_a_branch(tmp_path):
    """--save_top_k 2 with --num_checkpoint_keep 1: the two best validations' checkpoints, named by step and value,
    outlive retention; a run stopped in epoch 3 and resumed keeps the same two as a run never stopped; a branch from
    the older of them moves the newer aside and ends with the two best of its own history."""
    args = ["--epochs", "4", "--save_top_k", "2", "--num_checkpoint_keep", "1", "--lr_schedule", "constant"]

    def tops(run):
        return sorted(p.name for p in (run / "checkpoints").glob("top-step-*"))

    def best_two(run):
        losses = {int(r["step"]): float(r["val_loss"]) for r in rows(run) if r["val_loss"]}
        return sorted(top_k_name(step, "val_loss", losses[step]) for step in sorted(losses, key=losses.get)[:2])

    train(tmp_path / "straight", *args)
    straight = only_run(tmp_path / "straight")
    assert tops(straight) == best_two(straight) and len(checkpoints(straight)) == 1
    best = load(straight / "checkpoints" / "best.ckpt")
    assert best["best_value"] == min(float(r["val_loss"]) for r in rows(straight) if r["val_loss"])
    assert [load(straight / "checkpoints" / name)["global_step"] for name in tops(straight)] == \
        [int(name.split("-")[2]) for name in tops(straight)]

    train(tmp_path / "resumed", *args, driver=True, env={"FAULT": "sigusr1", "FAULT_AT_FORWARD": str(2 * EPOCH + 2)},
          check_rc=143)
    resumed = only_run(tmp_path / "resumed")
    train(tmp_path / "resumed", *args, "--resume", resumed)
    assert tops(resumed) == tops(straight)

    older, newer = tops(straight)
    train(tmp_path / "straight", *args, "--epochs", "5", "--resume", straight / "checkpoints" / older)
    (aside,) = (straight / "checkpoints").glob("abandoned-*")
    assert newer in [p.name for p in aside.iterdir()]
    assert tops(straight) == best_two(straight) and load(straight / "checkpoints" / "best.ckpt")["global_step"] > \
        int(older.split("-")[2])
