"""A saved vlp model directory: its layout, and safetensors weights whose bytes depend on the
weights alone.

Every family writes the same layout: `model.safetensors`, `vlp_config.json` (the `model`
params it was built from plus the transformers configs it needs to rebuild itself),
`tokenizer/`, and the JSON files a stage adds (the image transform, `task.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlp.errors import ConfigError
from vlp.io import atomic_dir, umask
from vlp.models.tokenizer import local_dir

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "vlp_config.json"
TOKENIZER_DIR = "tokenizer"


class SavedModel(torch.nn.Module, ABC):
    """What every model family shares: its `cfg` (params' model section) and `tokenizer`,
    text inputs, a parameter count and the model-directory write (`save_pretrained`).

    A family gives the transformers configs that rebuild it (`architecture_configs`).
    """

    cfg: Any
    tokenizer: Any

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", fresh: bool = False
    ) -> Any:
        """Load a model written by `save_pretrained` (safetensors only, never pickle).

        `fresh`: the same architecture and tokenizer with newly initialised weights (the
        from-scratch ablation); seed torch first for reproducible weights.
        """
        p = local_dir(path, "model directory")
        return cls.from_saved(p, read_saved(p), device, fresh)

    @classmethod
    @abstractmethod
    def from_saved(
        cls, p: Path, meta: dict[str, Any], device: str | torch.device, fresh: bool
    ) -> Any:
        """`from_pretrained` of the local model directory `p` whose vlp_config.json is `meta`."""

    @abstractmethod
    def architecture_configs(self) -> dict[str, Any]:
        """vlp_config.json entries besides `model`: the transformers configs as dicts."""

    def tokenize(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenise texts to {"input_ids", "attention_mask"} (padded to the longest, truncated
        at `max_length`, default `cfg.max_text_length`) on this model's device."""
        enc = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=max_length or self.cfg.max_text_length,
            return_tensors="pt",
        )
        device = next(self.parameters()).device
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied tensors counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def save_pretrained(
        self, path: str | os.PathLike, extra_json: dict[str, Any] | None = None
    ) -> None:
        """Write model.safetensors + vlp_config.json + tokenizer/ into `path`, atomically.

        `extra_json` maps further file names to JSON content written in the same step.
        """
        # a trained model's temperature is a learned weight, not a config entry
        saved = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "temperature"}
        meta = {"model": saved, **self.architecture_configs()}
        with atomic_dir(Path(path), "model") as tmp:
            save_weights(self, tmp / WEIGHTS_NAME)
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            for name, content in (extra_json or {}).items():
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def read_saved(p: Path, keys: Sequence[str] = ()) -> dict[str, Any]:
    """The checked vlp_config.json (`read_config`) of the model directory `p`, which must
    also hold its weights; ConfigError naming the directory otherwise."""
    if not (p / CONFIG_NAME).is_file():
        require_weights(p, missing=CONFIG_NAME)
    require_weights(p)
    return read_config(p, keys)


def require_weights(p: Path, missing: str = WEIGHTS_NAME) -> None:
    """ConfigError unless the model directory `p` holds its weights (`missing`: what it lacks)."""
    if missing == WEIGHTS_NAME and (p / WEIGHTS_NAME).exists():
        return
    pickles = ", ".join(f.name for f in sorted(p.glob("*.bin")))
    raise ConfigError(
        f"{p}: not a saved VLP model (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
        + (f"; {pickles}: pickle weights, which vlp does not load" if pickles else "")
    )


def read_config(p: Path, keys: Sequence[str] = ()) -> dict[str, Any]:
    """The parsed vlp_config.json of the model directory `p`, checked (`check_config`)."""
    path = p / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a vlp model config ({_one_line(e)})") from None
    check_config(meta, path, keys)
    return meta


def check_config(meta: Any, path: Path, keys: Sequence[str] = ()) -> None:
    """ConfigError naming `path` unless `meta` is an object whose `model` holds every
    `ModelConfig` field and that has the entries `keys` name.

    `family` may be absent (a directory written before families existed holds a fusion
    model); a key `a.b` is the entry `b` of the object `a`, e.g. an architecture config a
    family reads.
    """
    from vlp.config import ModelConfig

    missing = [k for k in keys if not _has(meta, k)]
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(model, dict):
        missing.insert(0, "model")
    else:
        # a saved model's temperature is a learned weight, not a config entry
        unsaved = ("family", "temperature")
        fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in unsaved]
        missing += [f"model.{f}" for f in fields if f not in model]
    if missing:
        raise ConfigError(
            f"{path}: lacks {', '.join(missing)} (not a model directory vlp wrote, or damaged)"
        )


def _has(meta: Any, dotted: str) -> bool:
    """Whether nested JSON objects hold the entry `a.b` (the entry `b` of the object `a`)."""
    *parents, last = dotted.split(".")
    for key in parents:
        meta = meta.get(key) if isinstance(meta, dict) else None
    return isinstance(meta, dict) and last in meta


def saved_model_config(meta: dict[str, Any]) -> Any:
    """The `ModelConfig` a vlp_config.json (read by `read_saved`) records; entries it does not
    know (e.g. the `loss_weights` older model directories carry) are ignored."""
    from vlp.config import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(
        **{
            "family": "fusion",
            **{k: v for k, v in meta["model"].items() if k in known},
            "temperature": None,
        }
    )


def save_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write `module`'s state dict to `path` as safetensors, tied tensors stored once.

    As `safetensors.torch.save_model` (which `load_model` reads), then `canonical_safetensors`.
    """
    from safetensors.torch import save_model

    save_model(module, str(path))
    canonical_safetensors(Path(path))


def canonical_safetensors(path: Path) -> None:
    """Give a safetensors file just written the mode of any new file and a sorted metadata.

    The writer emits the header's metadata (one entry per dropped alias of a tied tensor,
    adapter configs, ...) in the order of a hash map seeded per process, so identical
    weights gave files whose bytes differed from run to run, and DVC saw a changed output;
    and it makes the file private.
    """
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


def check_safetensors(path: Path) -> None:
    """ConfigError naming `path` unless it is a complete safetensors file (reads its header only).

    Complete: an 8-byte header length that stays within the file, a header that is a JSON
    object, and tensor data that ends exactly where the file ends.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ConfigError(f"{path}: {size} bytes, too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise ConfigError(
                    f"{path}: its header length ({length} bytes) runs past the end of the file "
                    f"({size} bytes): truncated, or not a safetensors file"
                )
            header = json.loads(f.read(length))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"{path}: its header is not JSON: not a safetensors file") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: its header is not a JSON object: not a safetensors file")
    end = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and type(offsets[1]) is int):
            raise ConfigError(f"{path}: the header entry {name!r} has no data offsets")
        end = max(end, offsets[1])
    if end != size - 8 - length:
        raise ConfigError(
            f"{path}: its tensors need {end} bytes of data after the header; the file holds "
            f"{size - 8 - length}: truncated, or not a safetensors file"
        )


def load_weights(
    module: torch.nn.Module,
    path: Path,
    device: str | torch.device = "cpu",
    what: str = "the model its config describes",
) -> None:
    """Load the safetensors file `path` into `module` on `device`: every tensor, strictly.

    A file that is not complete safetensors (`check_safetensors`), or whose tensors do not
    fit `module` (names or shapes; `what` names the module), is a ConfigError naming it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    check_safetensors(path)
    try:
        load_model(module, str(path), strict=True, device=str(device))
    except SafetensorError as e:
        raise ConfigError(f"{path}: cannot read its tensors ({_one_line(e)})") from None
    except RuntimeError as e:
        if not str(e).startswith("Error(s) in loading state_dict"):
            raise
        raise ConfigError(f"{path}: does not match {what}: {_one_line(e)}") from None


def load_transformers(model_class: Any, p: Path, key: str) -> Any:
    """`model_class.from_pretrained` of the local transformers checkpoint `p`, in fp32.

    Its safetensors files are checked first (`check_safetensors`). A pickle weights file
    (`pytorch_model.bin`) that holds more than tensors is refused by torch's weights-only
    loader, never unpickled; that, and any file transformers cannot read, is a ConfigError
    naming `key` and the checkpoint.
    """
    from safetensors import SafetensorError

    for f in sorted(p.glob("*.safetensors")):
        check_safetensors(f)
    try:
        return model_class.from_pretrained(str(p), local_files_only=True, dtype=torch.float32)
    except pickle.UnpicklingError:
        files = ", ".join(f.name for f in sorted(p.glob("*.bin"))) or "its weights"
        raise ConfigError(
            f"{key}: {p}: {files}: a pickle holding more than tensors; not loaded (only "
            "safetensors files and pickles of plain tensors are read)"
        ) from None
    except (OSError, ValueError, SafetensorError) as e:
        raise ConfigError(
            f"{key}: cannot load a {model_class.__name__} from {p}: {_one_line(e)}"
        ) from None


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (the CLI prints one line per error)."""
    return " ".join(str(e).split())


def checkpoint_model_type(p: Path) -> str | None:
    """The `model_type` of a transformers checkpoint directory's config.json; None when it has
    none or it cannot be read (not a checkpoint of that kind)."""
    path = p / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("model_type")
    except (ValueError, AttributeError, OSError):
        return None
