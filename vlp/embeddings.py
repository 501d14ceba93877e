"""Embeddings of a dataset's images and captions from any checkpoint (`vlp embed`).

The checkpoint runs as `vlp zeroshot` runs it (`vlp.inference.load_inference`: any family,
`zeroshot.batch_size`, the resolved precision). The output is one Parquet file with a row
per image, then one per caption, each with its L2-normalised ITC embedding; its metadata
names the model (and its content hash), the data, split and precision, and marks it as
written by `vlp embed`, the only file `--out` replaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlp.errors import OutputError
from vlp.inference import Inference, load_inference
from vlp.io import check_writable
from vlp.zeroshot import image_features, split_pairs, text_features

if TYPE_CHECKING:
    from vlp.config import Config

EMBEDDINGS_MARKER = {b"vlp.output": b"embeddings"}  # Parquet metadata of files `vlp embed` wrote


def check_embeddings_out(out: Path) -> None:
    """OutputError unless `out` can take the embeddings: its folder exists, and it is new
    or a file `vlp embed` wrote (never a directory or another file)."""
    import pyarrow.parquet as pq

    if not out.parent.is_dir():
        raise OutputError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise OutputError(f"--out {out}: is a directory; name a .parquet file")
    check_writable({f"--out {out}": out.parent})
    if not out.exists():
        return
    try:
        meta = pq.read_schema(out).metadata or {}
    except (OSError, ValueError):
        meta = {}
    if not all(meta.get(k) == v for k, v in EMBEDDINGS_MARKER.items()):
        raise OutputError(
            f"--out {out}: exists and was not written by `vlp embed`; move it away or "
            "choose another path"
        )


def embeddings_table(run: Inference, data_dir: Path, split: str | None) -> Any:
    """A pyarrow Table: one row per image, then one per caption, with its embedding.

    Columns: kind ("image" | "text"), image_id, caption_id (null for images), image_path,
    text (the caption; null for images), embedding (list<float32>, L2-normalised).
    """
    import pyarrow as pa

    pairs, images = split_pairs(data_dir, split)
    _, image_feat = image_features(run, data_dir, list(images["image_path"]))
    text_feat = text_features(run, [str(c) for c in pairs["caption"]])
    n_img, n_txt = len(images), len(pairs)
    feats = torch.cat([image_feat, text_feat]).cpu().numpy().astype(np.float32)
    dim = feats.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), dim).cast(
        pa.list_(pa.float32())
    )
    table = pa.table(
        {
            "kind": pa.array(["image"] * n_img + ["text"] * n_txt, pa.string()),
            "image_id": pa.array(
                [*images["image_id"].astype("int64"), *pairs["image_id"].astype("int64")],
                pa.int64(),
            ),
            "caption_id": pa.array(
                [None] * n_img + [int(c) for c in pairs["caption_id"]], pa.int64()
            ),
            "image_path": pa.array([*images["image_path"], *pairs["image_path"]], pa.string()),
            "text": pa.array([None] * n_img + [str(c) for c in pairs["caption"]], pa.string()),
            "embedding": embedding,
        }
    )
    return table


def embed(
    cfg: Config,
    model_dir: Path,
    data_dir: Path,
    out: Path,
    *,
    split: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
) -> Path:
    """Write the embeddings of `data_dir`'s images and captions (one split, or all) to `out`."""
    import pyarrow.parquet as pq

    from vlp.data.manifest import check_split_names
    from vlp.io import atomic_path
    from vlp.tasks import model_sha256

    if split is not None:
        check_split_names(split, "--split")
    out = Path(out)
    check_embeddings_out(out)
    run = load_inference(cfg, model_dir, precision, batch_size)
    table = embeddings_table(run, data_dir, split)
    meta = {
        **EMBEDDINGS_MARKER,
        b"vlp.model": str(model_dir).encode(),
        b"vlp.model_sha256": model_sha256(model_dir).encode(),
        b"vlp.data": str(data_dir).encode(),
        b"vlp.split": (split or "all").encode(),
        b"vlp.precision": run.precision.encode(),
    }
    check_embeddings_out(out)  # again: encoding may have taken long
    with atomic_path(out) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)
    return out
