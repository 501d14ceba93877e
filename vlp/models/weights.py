"""Model weights as safetensors files whose bytes depend on the weights alone."""

from __future__ import annotations

import json
import os
import struct

import torch

from vlp.io import umask


def save_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write `module`'s state dict to `path` as safetensors, tied tensors stored once.

    As `safetensors.torch.save_model` (which `load_model` reads), but the header's
    metadata (one entry per dropped alias of a tied tensor) is sorted: the writer emits it
    in the order of a hash map seeded per process, so identical weights gave files whose
    bytes differed from run to run, and DVC saw a changed output. The file gets the mode
    of any new file (the writer makes it private).
    """
    from safetensors.torch import save_model

    save_model(module, str(path))
    os.chmod(path, 0o666 & ~umask())
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None)
        if not metadata:
            return
        ordered = {"__metadata__": dict(sorted(metadata.items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        # Same entries in another order: never longer; the header is space-padded anyway.
        f.seek(8)
        f.write(text.ljust(size, b" "))
