"""Export a Hugging Face run's weights as a Hugging Face model folder: LoRA adapters merged into the base (or the
fully fine-tuned model), saved with save_pretrained (safetensors) beside the tokenizer, for
AutoModelForCausalLM.from_pretrained and any tool that reads one.

    python export.py --out_dir runs/20261201-120000-shakespeare_hf --to models/shakespeare-merged
    python export.py --out_dir RUN --to DIR --checkpoint last      # default: best (checkpoints/best.ckpt) if any

It only reads the run; the folder appears whole or not at all (written beside it, then renamed).
"""

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

from config import load_run_config
from data import hf_tokenizer
from model import CausalLM, make_model
from utils.exits import exit_run, fail
from utils.launching import make_fabric
from utils.run_dir import load_weights_for_reading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, required=True, help="The run folder of a Hugging Face run.")
    parser.add_argument("--to", type=Path, required=True, help="The model folder to write (new or empty).")
    parser.add_argument("--checkpoint", default=None,
                        help="best, last (the newest that opens) or a file; default: best if the run has one.")
    args, rest = parser.parse_known_args()
    if args.to.exists() and (not args.to.is_dir() or any(args.to.iterdir())):
        fail(f"to={str(args.to)!r} is invalid: expected a new or empty folder (nothing is overwritten)")
    cfg, _ = load_run_config(args.out_dir, rest, description=__doc__)
    if cfg.model.arch != "hf":
        fail(f"out_dir={str(args.out_dir)!r} is a run of arch={cfg.model.arch!r}: export.py writes Hugging Face "
             f"models (arch hf)")

    # the run's weights (their moving average where it kept one) into the model, on this process's CPU
    fabric = make_fabric(dataclasses.replace(cfg, accelerator="cpu", devices=1, num_nodes=1, strategy="auto"))
    model: CausalLM = make_model(cfg)
    checkpoint = load_weights_for_reading(fabric, args.out_dir, args.checkpoint, model)
    lm = model.lm.merge_and_unload() if cfg.model.lora_r else model.lm  # W + (alpha / r) B A, adapters gone

    # written under a temporary name beside the target, then renamed into place
    tmp = args.to.with_name(f".{args.to.name}.{os.getpid()}.tmp")
    try:
        lm.save_pretrained(tmp, safe_serialization=True)
        hf_tokenizer(cfg.model.hf_path).save_pretrained(tmp)
        if args.to.exists():
            args.to.rmdir()  # empty, checked above
        os.replace(tmp, args.to)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"to={str(args.to)!r} cannot be written ({err.strerror or err})", status=1)
    print(f"exported {checkpoint} to {args.to}: AutoModelForCausalLM.from_pretrained({str(args.to)!r})")


if __name__ == "__main__":
    main()
    exit_run(0, teardown=False)  # saves the second that freeing torch and lightning takes (utils/exits.py)
