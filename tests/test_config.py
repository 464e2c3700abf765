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


def test_a_data_or_model_setting_may_be_named_under_its_group():
    cfg = parse_config(["--data.dataset", "shakespeare_char", "--model.arch=gpt", "--data.streaming", "true"])
    assert cfg == parse_config(["--dataset", "shakespeare_char", "--arch", "gpt", "--streaming", "true"])
    assert cfg.data.streaming is True


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
    (["--monitor", "f1"], "monitor='f1' is invalid: expected val_<name>"),
    (["--monitor_mode", "up"], "'up'"),
    (["--out_dir", "x" * 240], "expected a name of at most 239 bytes"),
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
    (["--data.n_layer", "3"], "--data.n_layer"),  # a setting under a group it is not in
    (["--strategy", "fsdp"], "strategy='fsdp' is invalid: expected one of auto, ddp, ddp_find_unused_parameters_true, "
                             "fsdp2 (the strategies this template runs; fsdp2 covers FSDP1 and DeepSpeed's ZeRO)"),
    (["--strategy", "deepspeed_stage_3"], "strategy='deepspeed_stage_3' is invalid: expected one of auto, ddp, "),
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
    ("epochs: 3\n  base_lr: 0.1\n", "YAML error at line 2, column 10: mapping values are not allowed here"),
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
    (["--devices", "2", "--eff_batch_size", "63"], "the nearest that can is 62 or 64"),  # not over 2 processes
    (["--devices", "-1"], "devices=-1 is invalid for accelerator='cpu'"),  # Fabric takes these on GPUs only
    (["--devices", "0,1"], "devices='0,1' is invalid for accelerator='cpu'"),
    (["--root_dir", "/proc/no/runs"], "root_dir='/proc/no/runs' cannot be written (/proc: "),
    (["--monitor", "val_f1"], "monitor='val_f1' is invalid: expected one of val_"),  # not a metric of make_metrics
    (["--monitor_mode", "max"], "monitor_mode='max' is invalid: expected min: a higher val_loss is worse"),
    (["--eff_batch_size", "4096"], "eff_batch_size=4096"),  # larger than the training set
    (["--resume", "no/such/run"], "resume='no/such/run'"),
    (["--init_from", "no/such/weights.pt"], "init_from='no/such/weights.pt': no such file"),
])
def test_train_refuses_bad_input_and_writes_nothing(root, args, needle):
    result = run_script("train.py", "--root_dir", root, "--accelerator", "cpu", *args, check_rc=2, timeout=60)
    assert_one_error_line(result, needle)
    assert list(root.iterdir()) == []
    assert "Starting with 2 processes" not in result.stderr + result.stdout  # refused before any process starts


def test_test_py_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = run_script("test.py", "--out_dir", tmp_path, check_rc=2)
    assert_one_error_line(result, f"out_dir='{tmp_path}'")
    assert list(tmp_path.iterdir()) == []


def test_monitor_mode_follows_the_metric(capsys):
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    from utils.early_stopping import monitor_direction

    class MeanLoss(MeanMetric):
        higher_is_better = False

    metrics = {"loss": MeanLoss(), "acc": MulticlassAccuracy(3)}
    assert monitor_direction(parse_config([]), metrics) == "min"
    assert monitor_direction(parse_config(["--monitor", "val_acc"]), metrics) == "max"
    assert monitor_direction(parse_config(["--monitor", "val_acc", "--monitor_mode", "max"]), metrics) == "max"
    with pytest.raises(SystemExit):
        monitor_direction(parse_config(["--monitor", "val_acc", "--monitor_mode", "min"]), metrics)
    assert "monitor_mode='min' is invalid: expected max: a higher val_acc is better" in capsys.readouterr().err
    silent = {"score": MeanMetric()}  # a metric that does not say which way is better needs --monitor_mode
    assert monitor_direction(parse_config(["--monitor", "val_score", "--monitor_mode", "max"]), silent) == "max"
    with pytest.raises(SystemExit):
        monitor_direction(parse_config(["--monitor", "val_score"]), silent)
    assert "monitor_mode is needed for monitor='val_score'" in capsys.readouterr().err


def test_a_runs_record_is_typed_and_never_parsed_as_text():
    """A value a run accepted is one it reads back: a comment starting with '-' (the parser would take it for a
    flag), non-ASCII text, devices as a string."""
    saved = {"comment": "-v2 \u6e29\u5ea6", "devices": "0,1", "epochs": 3, "model": {"n_layer": 2}}
    cfg = parse_config(["--epochs", "4"], saved=saved)
    assert (cfg.comment, cfg.devices, cfg.epochs, cfg.model.n_layer) == ("-v2 \u6e29\u5ea6", "0,1", 4, 2)
    assert parse_config(["--comment=-v3"], saved=saved).comment == "-v3"


@pytest.mark.parametrize("unset", [["--max_steps", "none"], ["--max_steps=None"], ["--config_path", "FILE"]])
def test_none_unsets_an_optional_setting_over_the_record_and_a_file(tmp_path, unset):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: null\n")
    unset = [str(path) if arg == "FILE" else arg for arg in unset]
    saved = {"max_steps": 25, "grad_clip": 1.0}
    cfg = parse_config([*unset, "--grad_clip", "none"], saved=saved)
    assert (cfg.max_steps, cfg.grad_clip) == (None, None)
    assert parse_config(["--max_steps", "none", "--max_steps", "7"], saved=saved).max_steps == 7  # the last word wins


def test_hardware_of_a_record_yields_to_the_launcher(monkeypatch):
    saved = {"accelerator": "cpu", "devices": 1, "precision": "64-true", "epochs": 3}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nnodes 2 --nproc_per_node 2
    cfg = parse_config([], saved=saved)
    assert (cfg.devices, cfg.num_nodes, cfg.accelerator, cfg.precision) == (2, 2, "cpu", "64-true")
    assert parse_config(["--devices", "1"], saved=saved).devices == 1  # given on this command: launch() refuses it
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name)
    for name, value in {"LT_CLI_USED": "1", "LT_ACCELERATOR": "cpu", "LT_DEVICES": "2", "LT_NUM_NODES": "1",
                        "LT_PRECISION": "bf16-mixed"}.items():
        monkeypatch.setenv(name, value)  # fabric run: Fabric reads these and refuses other values given in code
    cfg = parse_config([], saved=saved)
    assert (cfg.accelerator, cfg.devices, cfg.num_nodes, cfg.precision, cfg.epochs) == ("auto", "auto", 1, None, 3)
