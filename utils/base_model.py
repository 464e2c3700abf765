"""The base model a fine-tuning run starts from (--hf_path), recorded in config.yaml at the first start and checked
whenever the run is resumed or read: adapters trained on one base are silently wrong on another."""

import hashlib
from pathlib import Path

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def describe_base(path_or_name: str) -> dict:
    """{path: the folder or hub name, and revision: the hub commit of a cached hub model, or sha256: of a local
    folder's weight files in name order}."""
    folder = Path(path_or_name)
    if not folder.is_dir():  # a hub name: its commit, from the snapshot folder of the local cache
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path_or_name, "config.json")
        return {"path": path_or_name, "revision": Path(cached).parent.name if isinstance(cached, str) else None}
    digest = hashlib.sha256()
    for file in sorted(file for pattern in WEIGHT_FILES for file in folder.glob(pattern)):
        with open(file, "rb") as weights:
            digest.update(hashlib.file_digest(weights, "sha256").digest())
    return {"path": str(folder.resolve()), "sha256": digest.hexdigest()}


def base_record(cfg) -> dict:
    """What config.yaml records of the run's base model: {} for a model without one."""
    return {"base_model": describe_base(cfg.model.hf_path)} if cfg.model.hf_path else {}


def base_change(run_dir: Path, recorded: dict | None, path_or_name: str) -> str | None:
    """Why the base at `path_or_name` is not the one run_dir's config.yaml `recorded`, in one line; None if it is
    (or none was recorded)."""
    if not recorded:
        return None
    now = describe_base(path_or_name)
    for key in ("sha256", "revision"):
        if recorded.get(key) and recorded[key] != now.get(key):
            return (f"hf_path={path_or_name!r} is not the base model of run {run_dir}: its {key} is "
                    f"{str(now.get(key))[:12]}..., the run recorded {recorded[key][:12]}... ({recorded['path']}); "
                    f"the run's weights fit that base only")
    return None
