"""Read the values an offline W&B run logged, straight from its `run-<id>.wandb` file.

Offline runs write no wandb-summary.json; the data lives in a LevelDB-style log of
`wandb_internal_pb2.Record` protobufs: a 7-byte file header (":W&B", magic, version), then
32 KiB blocks of records with 7-byte headers (crc32, length, type FULL/FIRST/MIDDLE/LAST).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B datastore"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


def _items(items, unwrap: bool = False) -> dict:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        value = json.loads(item.value_json)
        if unwrap and isinstance(value, dict) and set(value) == {"value"}:
            value = value["value"]  # the run record wraps config values as {"value": v}
        out[key] = value
    return out


def history(path: Path) -> list[dict]:
    """The history rows of one .wandb file."""
    return [_items(r.history.item) for r in read_records(path) if r.WhichOneof("record_type") == "history"]


def read_run(run_dir: Path) -> dict:
    """{'history': [row, ...], 'config': {...}, 'summary': {...}, 'run_id': str} of the one offline run under run_dir."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {run_dir}, found {files}"
    history, config, summary, run_id, group = [], {}, {}, None, None
    for record in read_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "config":
            config.update(_items(record.config.update, unwrap=True))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "run":
            run_id = record.run.run_id
            group = record.run.run_group or None
            config.update(_items(record.run.config.update, unwrap=True))
    return {"history": history, "config": config, "summary": summary, "run_id": run_id, "group": group, "file": files[0]}
