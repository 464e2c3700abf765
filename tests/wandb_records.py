"""Reads back what wandb wrote offline: the history rows in a run's `.wandb` file.

wandb 0.31 has no Python reader for these files (it moved to wandb's Go core), so this reads the format itself:
a 7-byte header (":W&B", magic, version), then LevelDB-log blocks of 32 KiB holding records of 7-byte headers
(checksum, length, type: 1 full, 2 first, 3 middle, 4 last), each record a protobuf `Record`.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb file"
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if left_in_block < HEADER or (kind == 0 and length == 0):  # padding up to the next block
            pos += left_in_block
            continue
        parts += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(parts)
            parts = b""


def history(path: Path) -> list[dict]:
    """The logged rows, in order: {metric: value} with the template's step as `trainer/global_step`."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def exit_record(path: Path) -> int | None:
    """The exit code wandb.finish() recorded, or None if the run was never finished."""
    for record in records(path):
        if record.WhichOneof("record_type") == "exit":
            return record.exit.exit_code
    return None
