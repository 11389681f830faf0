"""Read HF-format checkpoints lazily: config.json plus one or more *.safetensors files.

Only the tensors asked for are read, so an expert server's memory follows its share of experts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from moe_serve.core.spec import ModelSpec
from moe_serve.model.config import ConfigError, spec_from_config

_SAMPLE = 4096  # bytes hashed at a few offsets of each file for the fingerprint
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """A checkpoint that cannot be served: names the file, tensor or field at fault."""


class Checkpoint:
    """A checkpoint directory: its config, spec, and a lazy name -> tensor reader."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: no config.json (is this a checkpoint directory?)")
        try:
            self.config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err
        try:
            self.spec: ModelSpec = spec_from_config(self.config)
        except ConfigError as err:
            raise CheckpointError(f"{self.path}: {err}") from err
        self._file_of = self._index_tensors()
        self._handles: dict[Path, object] = {}

    def _index_tensors(self) -> dict[str, Path]:
        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            return {name: self.path / fname for name, fname in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        file_of: dict[str, Path] = {}
        for f in files:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not dicts
                    file_of[name] = f
        return file_of

    def _handle(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in the index but missing")
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    @property
    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self._file_of)

    def has(self, name: str) -> bool:
        """True if the checkpoint holds tensor `name`."""
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` without reading its data."""
        return tuple(self._handle(self._require(name)).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors dtype of tensor `name` ("BF16", "F32", ...) without reading its data."""
        return self._handle(self._require(name)).get_slice(name).get_dtype()

    def nbytes(self, name: str) -> int:
        """Bytes of tensor `name` on disk, from the file header."""
        count = 1
        for d in self.shape(name):
            count *= d
        return count * _DTYPE_BYTES[self.dtype(name)]

    def _require(self, name: str) -> Path:
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        return self._file_of[name]

    def load(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one tensor; if `shape` is given, a different shape is an error naming the tensor."""
        tensor = self._handle(self._require(name)).get_tensor(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        return tensor

    def fingerprint(self) -> str:
        """sha256 of the config, the tensor index and a sample of each file's bytes; reads little data.

        Two checkpoints of one architecture but different weights (a fine-tune, another seed) differ
        in the sampled bytes, so a gateway and servers on different weights refuse each other.
        """
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for name in sorted(self._file_of):
            sl = self._handle(self._file_of[name]).get_slice(name)
            digest.update(f"{name}|{sl.get_dtype()}|{sl.get_shape()}\n".encode())
        for file in sorted(set(self._file_of.values())):
            size = file.stat().st_size
            with open(file, "rb") as f:
                for offset in (size // 3, size // 2, max(size - _SAMPLE, 0)):
                    f.seek(offset)
                    digest.update(f.read(_SAMPLE))
        return digest.hexdigest()[:16]
