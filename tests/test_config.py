"""Config parsing: defaults, files, flags, --help, and every bad input as one line with exit status 2."""

import dataclasses

import pytest
from conftest import assert_one_error_line, run_script

from config import Config, parse_config


def test_flags_override_file_override_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nbase_lr: 0.01\nlogger_name: [csv, wandb]\nprecision: 64-true\ndevices: 2\n")
    cfg = parse_config(["--config_path", str(path), "--epochs", "5"])
    assert (cfg.epochs, cfg.base_lr, cfg.logger_name, cfg.precision, cfg.devices) == (5, 0.01, ["csv", "wandb"],
                                                                                        "64-true", 2)
    assert parse_config([]) == Config()


def test_a_runs_config_yaml_works_as_config_path(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("epochs: 7\nderived:\n  world_size: 4\n")
    assert parse_config(["--config_path", str(path)]).epochs == 7


def test_resume_in_a_users_yaml_is_kept_but_a_runs_record_never_resumes(tmp_path):
    mine, record = tmp_path / "mine.yaml", tmp_path / "config.yaml"
    mine.write_text("resume: auto\n")
    record.write_text("resume: runs/20261122-104500-train_out\nepochs: 7\nderived:\n  world_size: 1\n")
    assert parse_config(["--config_path", str(mine)]).resume == "auto"
    assert parse_config(["--config_path", str(record)]).resume is None


def test_help_lists_every_field_with_its_help():
    out = " ".join(run_script("train.py", "--help").stdout.split())
    for field in dataclasses.fields(Config):
        for inner in dataclasses.fields(field.type) if dataclasses.is_dataclass(field.type) else [field]:
            assert f"--{inner.name}" in out  # the data and model settings keep short flags
    assert "ModelConfig" in out and "GPT: transformer blocks" in out
    assert "Samples per optimizer step, summed over all devices and nodes" in out
    assert "torchrun" in out  # the launch commands of the module docstring


BAD_FLAGS = [
    (["--precision", "fp8"], "precision='fp8'"),
    (["--accelerator", "abacus"], "accelerator='abacus'"),
    (["--strategy", "magic"], "strategy='magic'"),
    (["--devices", "0"], "devices=0"),
    (["--num_nodes", "0"], "num_nodes=0"),
    (["--epochs", "0"], "epochs=0"),
    (["--eff_batch_size", "-8"], "eff_batch_size=-8"),
    (["--micro_batch_size", "0"], "micro_batch_size=0"),
    (["--base_batch_size", "0"], "base_batch_size=0"),
    (["--base_lr", "-0.1"], "base_lr=-0.1"),
    (["--log_per_epoch", "0"], "log_per_epoch=0"),
    (["--checkpoint_frequency", "0"], "checkpoint_frequency=0"),
    (["--num_checkpoint_keep", "0"], "num_checkpoint_keep=0"),
    (["--grad_clip", "0"], "grad_clip=0"),
    (["--dropout", "1.5"], "dropout=1.5"),
    (["--logger_name", "csv", "mlflow"], "'mlflow'"),
    (["--lr_scaling_rule", "cubic"], "'cubic'"),
    (["--epochs", "three"], "'three'"),
    (["--epoch", "3"], "--epoch"),  # abbreviations are refused, not guessed
    (["--strategy", "ddp_spawn"], "strategy='ddp_spawn' is invalid: expected one of auto, ddp,"),
    (["--strategy", "deepspeed"], "strategy='deepspeed'"),
    (["--out_dir", "runs/exp1"], "out_dir='runs/exp1' is invalid: expected a name, not a path"),
    (["--out_dir", ".."], "out_dir='..'"),
    (["--resume"], "--resume needs a value"),  # simple_parsing would quietly take None
    (["--logger_name"], "--logger_name needs a value"),  # ... or an empty list: a run with no logs
    (["--grad_clip", "--epochs", "3"], "--grad_clip needs a value"),
    (["--lr_schedule", "step"], "'step'"),
    (["--warmup_steps", "-1"], "warmup_steps=-1"),
    (["--max_steps", "10", "--warmup_steps", "10"], "warmup_steps=10 is invalid: expected smaller than max_steps=10"),
    (["--min_lr_ratio", "1.5"], "min_lr_ratio=1.5"),
    (["--lr_schedule", "exponential", "--min_lr_ratio", "0"], "min_lr_ratio=0.0 is invalid: expected above 0"),
    (["--beta1", "1"], "beta1=1.0"),
    (["--beta2", "-0.1"], "beta2=-0.1"),
    (["--monitor", "val_f1"], "'val_f1'"),
    (["--monitor_mode", "up"], "'up'"),
    (["--max_steps", "0"], "max_steps=0"),
    (["--early_stop_patience", "-1"], "early_stop_patience=-1"),
    (["--early_stop_min_delta", "-0.1"], "early_stop_min_delta=-0.1"),
    (["--val_every_n_steps", "0"], "val_every_n_steps=0"),
    (["--checkpoint_every_n_steps", "0"], "checkpoint_every_n_steps=0"),
    (["--log_every_n_steps", "0"], "log_every_n_steps=0"),
    (["--arch", "gpt"], "arch='gpt' is invalid: expected cnn for dataset='digits'"),
    (["--dataset", "shakespeare_char"], "arch='cnn' is invalid: expected gpt for dataset='shakespeare_char'"),
    (["--arch", "gpt", "--dataset", "shakespeare_char", "--n_embd", "100", "--n_head", "3"],
     "n_embd=100 is invalid: expected a multiple of n_head=3"),
    (["--n_layer", "0"], "n_layer=0"),
    (["--block_size", "-4"], "block_size=-4"),
    (["--dataset", "imagenet"], "'imagenet'"),
    (["--n_layer"], "--n_layer needs a value"),
]


@pytest.mark.parametrize("argv,needle", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and needle in err, err


BAD_FILES = [
    ("foo: 1\n", "unknown key 'foo'"),
    ("logger_name: []\n", "logger_name=[]"),
    ("lr_schedule: step\n", "'step'"),  # Literals are checked for file values too
    ("epochs: abc\n", "'abc'"),
    ("precision: fp8\n", "precision='fp8'"),
    ("logger_name: [csv, mlflow]\n", "'mlflow'"),  # choices are checked for file values too
    ("- just\n- a list\n", "mapping"),
    ("epochs: [unclosed\n", "cannot be read"),
    ("n_layer: 2\n", "unknown key 'n_layer' (it belongs under model:)"),
    ("model:\n  n_layers: 2\n", "unknown key 'n_layers' under 'model'"),
    ("model: gpt\n", "'model' must be a mapping"),
    ("data:\n  dataset: imagenet\n", "'imagenet'"),
]


@pytest.mark.parametrize("text,needle", BAD_FILES)
def test_bad_config_file_is_one_line_exit_2(tmp_path, text, needle, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        parse_config(["--config_path", str(path)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "config_path=" in err and needle in err, err


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--config_path", str(tmp_path / "nope.yaml")])
    assert exc.value.code == 2 and "nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--precision", "fp8"], "precision='fp8'"),
    (["--devices", "2", "--eff_batch_size", "63"], "eff_batch_size=63"),  # cannot be split over 2 processes
    (["--eff_batch_size", "4096"], "eff_batch_size=4096"),  # larger than the training set
    (["--resume", "no/such/run"], "resume='no/such/run'"),
    (["--init_from", "no/such/weights.pt"], "init_from='no/such/weights.pt': no such file"),
])
def test_train_refuses_bad_input_and_writes_nothing(root, args, needle):
    result = run_script("train.py", "--root_dir", root, "--accelerator", "cpu", *args, check_rc=2)
    assert_one_error_line(result, needle)
    assert list(root.iterdir()) == []
    assert "Starting with 2 processes" not in result.stderr + result.stdout  # refused before any process starts


def test_test_py_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = run_script("test.py", "--out_dir", tmp_path, check_rc=2)
    assert_one_error_line(result, f"out_dir='{tmp_path}'")
    assert list(tmp_path.iterdir()) == []
