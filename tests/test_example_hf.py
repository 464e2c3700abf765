"""A Hugging Face causal LM fine-tuned on Tiny Shakespeare's speeches through the same train.py, test.py and
sample.py, from a local model folder (a 2-layer GPT-2 and a tokenizer trained on the text: nothing downloaded): LoRA
trains the adapters alone and checkpoints them alone, a resume is exact, export.py's merged model generates what
sample.py does, fsdp2 shards it, and a step's loss weighs every scored token once across micro-batches and ranks."""

import hashlib
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, assert_one_error_line, checkpoints, load, max_weight_diff, only_run, run_script

import train
from config import parse_config
from data import hf_tokenizer
from utils.checkpoint import read_model_weights

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-layer, 32-wide GPT-2 (about 40,000 parameters) with a 256+64-token tokenizer, no dropout."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_local_model.py"), folder, "--layers", "2",
                    "--width", "32", "--heads", "2", "--vocab", "320", "--context", "64", "--dropout", "0"],
                   check=True, capture_output=True)
    return folder


def hf_flags(base, root, *extra):
    return ["--config_path", str(REPO / "configs" / "shakespeare_hf.yaml"), "--hf_path", str(base), "--root_dir",
            str(root), "--accelerator", "cpu", "--logger_name", "csv", "--block_size", "32", "--eff_batch_size", "8",
            "--warmup_steps", "0", "--lr_schedule", "constant", "--lora_dropout", "0", *extra]


def test_lora_trains_adapters_alone_resumes_exactly_and_exports_what_sample_generates(base, tmp_path):
    steps = ["--val_every_n_steps", "3", "--checkpoint_every_n_steps", "3", "--base_lr", "0.05"]  # adapters that matter
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(parse_config(hf_flags(base, straight, "--max_steps", "6", *steps)))
    run_script("train.py", *hf_flags(base, split, "--max_steps", "3", *steps))  # a process that releases its run
    run = only_run(split)
    run_script("train.py", *hf_flags(base, split, "--max_steps", "6", *steps, "--resume", run))  # a new process
    final, resumed = load(checkpoints(only_run(straight))[-1]), load(checkpoints(run)[-1])
    assert final["global_step"] == resumed["global_step"] == 6
    assert max_weight_diff(final["model"], resumed["model"]) == 0  # bit-exact

    # the adapters alone are trained, in the optimizer and in the checkpoint; the base is not saved again
    adapters = final["model"]
    assert adapters and all("lora_" in key for key in adapters), list(adapters)
    assert len(final["optimizer"]["state"]) == len(adapters)
    assert checkpoints(run)[-1].stat().st_size < (base / "model.safetensors").stat().st_size / 2
    recorded = yaml.safe_load((run / "config.yaml").read_text())["derived"]["base_model"]
    weights_hash = hashlib.sha256(hashlib.sha256((base / "model.safetensors").read_bytes()).digest()).hexdigest()
    assert recorded == {"path": str(base.resolve()), "sha256": weights_hash}
    assert any(value.abs().max() > 0 for key, value in adapters.items() if "lora_B" in key)  # B starts at zero

    # test.py and sample.py read it; export.py's merged model generates the same text from from_pretrained
    tested = run_script("test.py", "--out_dir", run)
    assert "test loss" in tested.stdout
    sampled = run_script("sample.py", "--out_dir", run, "--max_new_tokens", "24", "--seed", "3").stdout
    run_script("export.py", "--out_dir", run, "--to", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    from sample import generate

    def text_of(folder):
        lm = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = hf_tokenizer(str(folder))
        tokens = generate(lambda ids: lm(input_ids=ids).logits, torch.tensor([tokenizer("\n")["input_ids"]]), 24,
                          32, 0.8, 200, torch.Generator().manual_seed(3))
        return tokenizer.decode(tokens[0].tolist()) + "\n"

    assert text_of(tmp_path / "merged") == sampled
    assert text_of(base) != sampled  # control: the base without the adapters writes other text

    # a reader given another base refuses in one line
    other = tmp_path / "other-base"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_local_model.py"), other, "--layers", "2", "--width",
                    "32", "--heads", "2", "--vocab", "320", "--context", "64", "--seed", "1"], check=True,
                   capture_output=True)
    refused = run_script("test.py", "--out_dir", run, "--hf_path", other, check_rc=2)
    assert_one_error_line(refused, "is not the base model of run", "sha256")


@pytest.mark.slow
def test_full_fine_tuning_saves_every_weight_and_fsdp2_shards_and_resumes_lora(base, tmp_path):
    full = tmp_path / "full"
    train.main(parse_config(hf_flags(base, full, "--max_steps", "2", "--lora_r", "0")))
    saved = load(checkpoints(only_run(full))[-1])
    assert not any("lora_" in key for key in saved["model"])
    assert len(saved["optimizer"]["state"]) == sum(1 for key in saved["model"] if "lm_head" not in key)  # tied

    # fsdp2 over 2 processes: shards of the adapters alone, a resume equal to a straight run, test.py reads them
    fsdp2 = ["--devices", "2", "--strategy", "fsdp2", "--checkpoint_every_n_steps", "2", "--base_lr", "0.05"]
    straight, split = tmp_path / "fsdp2", tmp_path / "fsdp2-split"
    run_script("train.py", *hf_flags(base, straight, "--max_steps", "4", *fsdp2))
    run_script("train.py", *hf_flags(base, split, "--max_steps", "2", *fsdp2))
    run_script("train.py", *hf_flags(base, split, "--max_steps", "4", *fsdp2, "--resume", only_run(split)))
    final, resumed = (read_model_weights(checkpoints(only_run(root))[-1]) for root in (straight, split))
    assert checkpoints(only_run(split))[-1].is_dir() and all("lora_" in key for key in final)
    assert max_weight_diff(final, resumed) == 0
    assert "test loss" in run_script("test.py", "--out_dir", only_run(split)).stdout


@pytest.mark.slow
def test_a_steps_loss_weighs_every_scored_token_once_across_micro_batches_and_ranks(base, tmp_path, monkeypatch):
    """Speeches of unequal length, padded: one batch of 8, 4 micro-batches of 2, and 2 ranks x 2 micro-batches of 2
    end with the same weights at 64-true; a mean of per-micro-batch means (loss_weight None) does not."""
    common = ["--max_steps", "2", "--precision", "64-true", "--lora_r", "0", "--seed", "5"]
    results = {}
    for name, extra in {"one batch": [], "accumulated": ["--micro_batch_size", "2"]}.items():
        train.main(parse_config(hf_flags(base, tmp_path / name, *common, *extra)))
        results[name] = load(checkpoints(only_run(tmp_path / name))[-1])["model"]
    run_script("train.py", *hf_flags(base, tmp_path / "ranks", *common, "--micro_batch_size", "2", "--devices", "2"))
    results["ranks"] = load(checkpoints(only_run(tmp_path / "ranks"))[-1])["model"]
    assert max_weight_diff(results["one batch"], results["accumulated"]) < 1e-12
    assert max_weight_diff(results["one batch"], results["ranks"]) < 1e-12

    monkeypatch.setattr(train, "loss_weight", lambda batch, cfg: None)  # control: every micro-batch weighs the same
    train.main(parse_config(hf_flags(base, tmp_path / "means", *common, "--micro_batch_size", "2")))
    means = load(checkpoints(only_run(tmp_path / "means"))[-1])["model"]
    assert max_weight_diff(results["one batch"], means) > 1e-6
