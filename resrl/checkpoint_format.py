"""What a checkpoint's files hold, written and read as data only (README, "What a checkpoint may
contain"): meta.json's JSON, which gives tuples and tensors back exactly; torch.distributed.checkpoint's
pickles (its index, `.metadata`, and the non-tensor values inside the shards) read through unpicklers
that admit only what those hold; the checksums of files (CRC-32). `resrl.checkpoint` lays the files out, saves,
verifies and resumes.

DCP itself reads its index with `pickle.load` and those values with `torch.load(weights_only=False)`,
which run whatever a pickle names; `IndexReader` and `WeightsOnlyPlanner` take their place in
`dcp.load`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, ReadItem
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from resrl.config import RunError

REFUSED = (
    "refused, nothing in it was run (planted there, or damaged: move that checkpoint folder out of "
    "checkpoints/ to resume from the one before)"
)


class CheckpointRefused(RunError):
    """A checkpoint file that could run code when loaded: a pickle that names anything besides plain
    data and DCP's index classes, or the pickled meta.pt of earlier versions. Nothing in it ran."""


# ---------------------------------------------------------------------------- meta.json


# One-key dicts that stand for what JSON has no type for.
_TAGS = ("__tuple__", "__items__", "__tensor__")


def to_json(value: Any, where: str) -> Any:
    """`value` as JSON data that `from_json` turns back into an equal value of the same types:
    tuples, tensors (dtype, shape, bytes in base64) and dicts whose keys are not all strings are
    tagged. `where` names the value in the error for one that cannot be stored."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
            return {k: to_json(v, f"{where}.{k}") for k, v in value.items()}
        return {"__items__": [[to_json(k, where), to_json(v, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return {
            "__tensor__": {
                "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape),
                "base64": base64.b64encode(flat.numpy().tobytes()).decode("ascii"),
            }
        }
    raise TypeError(
        f"checkpoint meta {where}: a {type(value).__name__} cannot be stored in a checkpoint's meta.json; "
        "accepted: None, bool, int, float, str, list, tuple, dict, torch.Tensor"
    )


def from_json(value: Any) -> Any:
    """What `to_json` was given. Raises ValueError, KeyError or TypeError for JSON it did not make."""
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "__tuple__":
            return tuple(from_json(v) for v in body)
        if tag == "__items__":
            return {from_json(k): from_json(v) for k, v in body}
        if tag == "__tensor__":
            dtype = getattr(torch, body["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown tensor dtype {body['dtype']!r}")
            data = bytearray(base64.b64decode(body["base64"], validate=True))
            flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            return flat.view(dtype).reshape(body["shape"])
    return {k: from_json(v) for k, v in value.items()}


def json_checksum(body: dict[str, Any]) -> str:
    """The CRC-32 of JSON data as canonical JSON text (sorted keys, no spaces): the same for the
    data that `to_json` made and for that data read back from any JSON text of it."""
    return f"{zlib.crc32(json.dumps(body, sort_keys=True, separators=(',', ':')).encode()):08x}"


# ---------------------------------------------------------------------------- DCP's pickles


# What a DCP index pickles, found by unpickling real ones (one and two processes, FSDP2 and CPU
# offload, a KL reference, R²PO's head; torch 2.13) with a recording unpickler; torch dtypes, layouts
# and memory formats besides.
_INDEX_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


class _Forbidden(pickle.UnpicklingError):
    """A pickle names a global outside `_INDEX_GLOBALS`; `args[0]` is its dotted name."""


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a DCP index, admitting only the globals an index uses (Python's pickle docs,
    "Restricting Globals"): every class, function or object a pickle refers to passes here."""

    def find_class(self, module: str, name: str) -> Any:
        torch_values = (torch.dtype, torch.layout, torch.memory_format)
        if (module, name) in _INDEX_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch_values)
        ):
            return super().find_class(module, name)
        if not all(part.isidentifier() for part in (*module.split("."), *name.split("."))):
            # Not a name: random bytes, a damaged file rather than a planted one.
            raise pickle.UnpicklingError("not a pickle")
        raise _Forbidden(f"{module}.{name}")


class NotAnIndex(ValueError):
    """A file that does not unpickle to a DCP index (damaged); the message says how it fails."""


def read_index(file: Path) -> Metadata:
    """A DCP index (a checkpoint's `shards/.metadata`), through `_IndexUnpickler`. Raises
    CheckpointRefused when it names anything else, NotAnIndex when it is not an index."""
    try:
        with open(file, "rb") as f:
            index = _IndexUnpickler(f).load()
    except _Forbidden as e:
        raise CheckpointRefused(
            f"{file} names {e.args[0]}, which a torch.distributed.checkpoint index never holds: {REFUSED}"
        ) from None
    # A damaged pickle fails in many ways (UnpicklingError, EOFError, ValueError, KeyError, ...).
    except Exception as e:
        raise NotAnIndex((str(e).splitlines() or [type(e).__name__])[0][:120]) from e
    if not isinstance(index, Metadata):
        raise NotAnIndex(f"a pickled {type(index).__name__}, not a torch.distributed.checkpoint index")
    return index


class IndexReader(FileSystemReader):
    """DCP's file reader, handed the index that `read_index` read: its own read_metadata unpickles
    the file with pickle.load."""

    def __init__(self, path: Path, index: Metadata) -> None:
        super().__init__(path)
        self._index = index

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # What FileSystemReader.read_metadata does after unpickling.
        if getattr(self._index, "storage_meta", None) is None:
            self._index.storage_meta = StorageMeta()
        self._index.storage_meta.load_id = self.load_id
        return self._index


class WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, reading the non-tensor values in the shards (pickled by torch.save: the
    optimizer's hyperparameters) with torch's weights-only unpickler; its own load_bytes uses
    torch.load(weights_only=False). `shards` is the folder, named in the error."""

    def __init__(self, shards: Path) -> None:
        super().__init__()
        self._shards = shards

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            data = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            file = self._shards / self.metadata.storage_data[read_item.storage_index].relative_path
            named = re.search(r"GLOBAL (\S+)", str(e))
            raise CheckpointRefused(
                f"{file}: the saved value of {fqn} names {named.group(1) if named else 'something'} "
                f"besides plain data: {REFUSED}"
            ) from None
        # What DefaultLoadPlanner.load_bytes does with what it unpickled.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], data)
        else:
            self.state_dict[fqn] = data


# ---------------------------------------------------------------------------- file checksums


# The name of the checksum in meta.json. CRC-32 (zlib's; what zip archives, torch.save's among them,
# record per file) is there to find damage, which it misses with odds of 2^-32; it hashed 1.5-2.4x
# faster than SHA-256 and 3-4x faster than BLAKE2b on a 2-core test machine. A planted file is
# stopped by how the files are read, not by a checksum (whoever can plant one can rewrite meta.json).
CHECKSUM = "crc32"
_BLOCK = 1 << 20


def _crc32(file: Path) -> str:
    crc = 0
    block = bytearray(_BLOCK)
    view = memoryview(block)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(block):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def file_checksums(folder: Path, files: list[str]) -> dict[str, str]:
    """The CRC-32 of each file under `folder` as 8 hex digits, read in 1 MiB blocks, the files in
    parallel threads (a checkpoint has one shard file per rank; zlib releases the GIL)."""
    files = sorted(files, key=lambda rel: -(folder / rel).stat().st_size)
    workers = max(1, min(len(files), os.cpu_count() or 1, 16))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(files, pool.map(lambda rel: _crc32(folder / rel), files), strict=True))
