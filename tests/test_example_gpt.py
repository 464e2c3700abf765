"""The character-level GPT on Tiny Shakespeare through the same train.py, test.py and sample.py as the digits: the
data split, the presets, a short run that learns, exact resume, sampling, and bad input."""

import itertools
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, assert_one_error_line, load, only_run, run_script
from lightning.fabric import Fabric
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from config import Config, parse_config, settings_record
from data import IGNORE_INDEX, SHAKESPEARE, DataError, char_datasets, make_datasets, num_classes, vocabulary
from model import GPT, make_model
from train import evaluate, make_metrics, step_loss, validation_step
from utils.throughput import count_flops

PRESET = ["--config_path", str(REPO / "configs" / "shakespeare_char.yaml")]
# the preset, shrunk to a few seconds: a 2-layer, 64-wide GPT on 32-character windows
TINY = [*PRESET, "--accelerator", "cpu", "--logger_name", "csv", "--n_layer", "2", "--n_embd", "64",
        "--block_size", "32", "--warmup_steps", "20"]


def test_split_scores_every_held_out_character_once_and_trains_on_none():
    train, val, test = char_datasets(SHAKESPEARE, 64)
    tokens = train.tokens
    assert len(tokens) == 1_115_394
    train_end, val_end = 1_003_854, 1_003_854 + 55_770
    # the last training window's last target is the last character of the first 90%
    inputs, targets = train[len(train) - 1]
    assert len(train) == train_end - 64 and targets[-1] == tokens[train_end - 1]
    for split, start, end in ((val, train_end, val_end), (test, val_end, len(tokens))):
        pairs = [split[i] for i in range(len(split))]
        scored = torch.cat([t[t != IGNORE_INDEX] for _, t in pairs])
        assert torch.equal(scored, torch.from_numpy(tokens[start:end].astype(np.int64)))  # each once, in order
        for inputs, targets in pairs:  # inputs are the characters just before the targets
            n = int((targets != IGNORE_INDEX).sum())
            assert torch.equal(inputs[1:n], targets[: n - 1])
        assert pairs[0][0][0] == tokens[start - 1]


def test_presets_parse_and_their_values_reach_the_model():
    cpu = parse_config(PRESET)
    assert (cpu.model.n_layer, cpu.model.n_head, cpu.model.n_embd, cpu.model.block_size) == (4, 4, 128, 64)
    assert (cpu.eff_batch_size, cpu.base_batch_size, cpu.base_lr, cpu.max_steps, cpu.beta2) == (12, 12, 1e-3, 2000,
                                                                                             0.99)
    gpu = parse_config(["--config_path", str(REPO / "configs" / "shakespeare_char_gpu.yaml")])
    assert (gpu.model.n_layer, gpu.model.n_embd, gpu.model.block_size, gpu.dropout, gpu.eff_batch_size,
            gpu.base_batch_size) == (6, 384, 256, 0.2, 64, 64)
    model = make_model(cpu)
    assert isinstance(model, GPT) and len(model.blocks) == 4 and model.position_embedding.weight.shape == (64, 128)
    assert model.head.weight is model.token_embedding.weight  # tied
    # 4 x 196,864 per block + 16,512 embeddings + 128; nanoGPT prints 0.80M, leaving out the positions (8,192)
    assert sum(p.numel() for p in model.parameters()) == 804_096
    assert num_classes(cpu) == 65 and vocabulary(cpu)[:3] == "\n !"
    assert parse_config([*PRESET, "--n_layer", "6"]).model.n_layer == 6  # a flag beats the preset


@pytest.mark.parametrize("workload", ["digits", "gpt"])
def test_evaluate_equals_a_direct_computation(workload):
    """evaluate() serves (batch, classes) and (batch, time, vocab): it equals torchmetrics' accuracy and a plain
    mean cross-entropy over every scored target."""
    cfg = parse_config(["--seed", "3"] if workload == "digits" else [*TINY[:-2], "--n_layer", "1"])
    torch.manual_seed(0)
    model = make_model(cfg)
    _, val_set, _ = make_datasets(cfg)
    fabric = Fabric(accelerator="cpu", devices=1)
    result = evaluate(fabric, model, DataLoader(val_set, batch_size=7), cfg)
    inputs, targets = (torch.stack(t) for t in zip(*(val_set[i] for i in range(len(val_set))), strict=True))
    with torch.no_grad():
        logits = model.eval()(inputs).flatten(0, -2)  # evaluate() leaves the model in training mode
    targets = targets.flatten()
    scored = targets != IGNORE_INDEX
    accuracy = MulticlassAccuracy(num_classes(cfg), average="micro")(logits[scored], targets[scored]).item()
    loss = torch.nn.functional.cross_entropy(logits[scored], targets[scored]).item()
    assert result["acc"] == pytest.approx(accuracy, abs=1e-7) and result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["samples"] == len(val_set) and scored.sum() == (270 if workload == "digits" else 55_770)
    if workload == "digits":
        assert result["confusion"] == MulticlassConfusionMatrix(10)(logits, targets).tolist()


class CountWaits(TorchDispatchMode):
    """Counts the operators that make the host wait for a CUDA device: reading a value (.item(), `if tensor:`) and
    those whose output size depends on the values (boolean-mask indexing runs nonzero; bincount; unique)."""

    WAITS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default, torch.ops.aten.bincount.default, torch.ops.aten._unique2.default}

    def __init__(self):
        super().__init__()
        self.waits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.WAITS:
            self.waits.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("workload", ["digits", "gpt"])
def test_validation_steps_never_wait_for_the_device(workload):
    """No operator of the shipped validation_step and metrics waits for a GPU: validation reads back only in
    compute(). Control: torchmetrics' MeanMetric, as it comes, waits at every update (its NaN check)."""
    cfg = parse_config([] if workload == "digits" else [*TINY[:-2], "--n_layer", "1"])
    model = make_model(cfg).eval()
    _, val_set, _ = make_datasets(cfg)
    metrics = make_metrics(cfg)
    batches = list(itertools.islice(DataLoader(val_set, batch_size=16), 3))  # the loader reads its seed
    with torch.no_grad(), CountWaits() as counter:
        for batch in batches:
            validation_step(model, batch, metrics, cfg)
    assert counter.waits == []
    with CountWaits() as counter:
        MeanMetric().update(torch.ones(4))
    assert counter.waits != []


def unigram_entropy() -> float:
    """The loss of the best model that ignores context: it knows only how often each character occurs."""
    train, _, _ = char_datasets(SHAKESPEARE, 32)
    counts = np.bincount(train.tokens[: train.end], minlength=65).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    result = run_script("train.py", "--root_dir", root, *TINY, "--max_steps", "300", "--val_every_n_steps", "150",
                        "--checkpoint_every_n_steps", "150")
    return only_run(root), result


@pytest.mark.slow
def test_a_short_gpt_run_learns_from_context(gpt_run):
    run, result = gpt_run
    final = load(run / "checkpoints" / "best.ckpt")
    threshold = unigram_entropy()  # about 3.3; an untrained model scores ln(65) = 4.17
    assert final["best_value"] < threshold - 0.4, (final["best_value"], threshold)
    tested = run_script("test.py", "--out_dir", run)
    assert "on 1743 samples" in tested.stdout  # every test window once (each character: the test above)
    loss = float(tested.stdout.split("test loss ")[1].split(",")[0])
    assert loss < threshold - 0.4
    header = (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "tokens_per_sec" in header
    # 300 steps of an epoch of 1 million windows: no epochs printed or logged
    assert "step 150: val loss" in result.stdout and "(epoch" not in result.stdout and "epoch" not in header


@pytest.mark.slow
def test_sample_prints_the_requested_characters(gpt_run):
    run, _ = gpt_run
    chars = vocabulary(parse_config(PRESET))
    result = run_script("sample.py", "--out_dir", run, "--prompt", "ROMEO:", "--max_new_tokens", "200",
                        "--seed", "1")
    text = result.stdout.removesuffix("\n")
    assert len(text) == 206 and text.startswith("ROMEO:") and set(text) <= set(chars)
    assert "srun" not in result.stderr  # Lightning's warning where SLURM is installed (this suite installs it)
    bad = run_script("sample.py", "--out_dir", run, "--prompt", "R\u00f6meo", check_rc=2)
    assert_one_error_line(bad, "prompt='R\u00f6meo'")
    bad = run_script("sample.py", "--out_dir", run, "--prompt", "", check_rc=2)
    assert_one_error_line(bad, "prompt=''", "at least one character")


def test_sample_refuses_a_digits_run(tmp_path):
    run = tmp_path / "20261123-120000-train_out"  # the record of a digits run is enough: it is refused before loading
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(settings_record(Config())))
    result = run_script("sample.py", "--out_dir", run, check_rc=2)
    assert_one_error_line(result, "dataset='digits'", "needs a run on text")


def identical(a: dict, b: dict) -> bool:
    return a["global_step"] == b["global_step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def gpt_stopped(tmp_path_factory):
    """A straight run of 40 steps, and the same run stopped by a real SIGUSR1 at step 17 (an epoch has 83,000
    steps), both with dropout on."""
    root = tmp_path_factory.mktemp("resume")
    args = [*TINY, "--n_layer", "1", "--max_steps", "40", "--dropout", "0.1", "--checkpoint_every_n_steps", "100"]
    run_script("train.py", "--root_dir", root / "straight", *args)
    run_script("tests/fault_driver.py", "--root_dir", root / "stopped", *args,
               env={"FAULT": "sigusr1", "FAULT_AT_FORWARD": "17"}, check_rc=143)
    return root, args


@pytest.mark.slow
@pytest.mark.parametrize("part", ["none", "rng"])
def test_gpt_resumes_exactly_mid_epoch(gpt_stopped, tmp_path, part):
    """The resumed run ends bit-identical to the straight one. Negative control: without restoring the random state
    (the dropout masks) it differs."""
    root, args = gpt_stopped
    shutil.copytree(root / "stopped", tmp_path / "stopped")
    run_script("tests/fault_driver.py", "--root_dir", tmp_path / "stopped", *args, "--resume", "auto",
               env={"BREAK": part} if part != "none" else None)
    straight, resumed = (load(sorted((only_run(folder) / "checkpoints").glob("epoch-*.ckpt"))[-1])
                         for folder in (root / "straight", tmp_path / "stopped"))
    assert resumed["global_step"] == 40
    assert identical(resumed, straight) == (part == "none")


def test_data_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="block_size=2000000 is invalid"):
        char_datasets(SHAKESPEARE, 2_000_000)
    damaged = tmp_path / "tinyshakespeare.txt"
    for text in (SHAKESPEARE.read_bytes()[:500_000], SHAKESPEARE.read_bytes().replace(b"ROMEO", b"ROMEX", 1)):
        damaged.write_bytes(text)
        with pytest.raises(DataError, match="sha256"):
            char_datasets(damaged, 64)
    assert not list(tmp_path.glob("*.uint16"))  # nothing encoded from a damaged file


@pytest.mark.slow
def test_train_refuses_damaged_data_with_one_line(tmp_path):
    """Through train.py, a file with one character changed (the other errors of the data take the same path)."""
    repo = tmp_path / "repo"  # a copy, so that the shipped file stays intact
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".*", "runs", "tests", "__pycache__", "*.uint16"))
    text = repo / "assets" / "tinyshakespeare.txt"
    text.write_bytes(text.read_bytes().replace(b"ROMEO", b"ROMEX", 1))
    result = subprocess.run([sys.executable, repo / "train.py", "--root_dir", tmp_path / "runs", *TINY],
                            cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result, "tinyshakespeare.txt has sha256")
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made


def test_meta_device_count_of_the_gpt_matches_the_formula():
    """Forward and backward of the GPT preset, counted on the meta device: 6 FLOPs per token per weight of every
    matrix multiplication (the tied head included once per use) plus 12 x layers x batch x T^2 x width for
    attention (scores and values, forward and backward): the usual formula, to the FLOP."""
    cfg = parse_config(["--config_path", "configs/shakespeare_char.yaml"])
    batch, T, C, layers, vocab = 12, cfg.model.block_size, cfg.model.n_embd, cfg.model.n_layer, 65
    sample = (torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long))
    flops = count_flops(lambda: make_model(cfg), sample, batch, lambda m, b: step_loss(m, b, cfg))
    model = make_model(cfg)
    block_weights = sum(p.numel() for p in model.blocks.parameters() if p.dim() == 2)
    assert flops == 6 * (block_weights + vocab * C) * batch * T + 12 * layers * batch * T * T * C


def test_a_batch_of_training_windows_is_read_at_once():
    """RandomWindows.__getitems__ (which the DataLoader calls with a whole batch of indices) gives exactly the
    windows of __getitem__."""
    train_set, _, _ = make_datasets(parse_config(PRESET))
    indices = torch.randint(0, len(train_set), (32,), generator=torch.Generator().manual_seed(0)).tolist()
    batched, one_by_one = train_set.__getitems__(indices), [train_set[i] for i in indices]
    assert all(torch.equal(a, b) for pair in zip(batched, one_by_one, strict=True) for a, b in zip(*pair, strict=True))


def test_activation_checkpointing_recomputes_the_gpts_blocks_with_the_same_dropout():
    """Each block recomputed in the backward: bit-identical gradients at 64-true with dropout inside the blocks."""
    from test_features import gradients

    cfg = parse_config([*TINY, "--dropout", "0.3"])
    assert all(torch.equal(a, b) for a, b in zip(gradients(cfg, False), gradients(cfg, True), strict=True))
