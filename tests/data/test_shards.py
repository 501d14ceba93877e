"""Webdataset shards: writer and index, validation of damaged shards, streamed training pairs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vlp.cli import main
from vlp.data.images import Augmentation, image_transforms
from vlp.data.manifest import read_pairs, read_vqa
from vlp.data.shard_stream import ShardPairs
from vlp.data.shards import _totals, open_image, read_index, validate_shards, write_shards
from vlp.data.torch_data import PairsDataset, collate, make_pretrain_collate
from vlp.errors import DataError, OutputError
from vlp.io import OUTPUT_MARKER


@pytest.fixture(scope="module")
def shards(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke dataset's pretrain and train splits, 10 images per shard; read-only."""
    out = tmp_path_factory.mktemp("shards") / "shapes-shards"
    write_shards(smoke_data, out, samples_per_shard=10, splits=["pretrain", "train"])
    return out


def _members(shard: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return out


def _copy(shards: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(shards, tmp_path / "copy"))


def _stream(shards: Path, cfg, splits=("pretrain", "train"), **kw) -> ShardPairs:
    transform, _ = image_transforms(cfg)
    args = {"seed": 0, "shuffle_buffer": 0, "resampled": False} | kw
    return ShardPairs(shards, list(splits), transform, **args)


def test_writer_index_round_trip(shards, smoke_data, smoke_cfg):
    index = read_index(shards)
    pairs = read_pairs(smoke_data, ["pretrain", "train"])
    vqa = read_vqa(smoke_data, ["pretrain", "train"])
    n_images = pairs["image_id"].nunique()
    assert (shards / OUTPUT_MARKER).is_file()
    assert [s["samples"] for s in index["shards"]] == [10] * (n_images // 10) + (
        [n_images % 10] if n_images % 10 else []
    )
    assert index["total"]["samples"] == n_images
    assert index["total"]["splits"] == {
        "pretrain": {
            "images": smoke_cfg.data.n_pretrain,
            "captions": 5 * smoke_cfg.data.n_pretrain,
        },
        "train": {"images": smoke_cfg.data.n_train, "captions": 5 * smoke_cfg.data.n_train},
    }
    seen_captions: Counter[int] = Counter()
    seen_images: Counter[int] = Counter()
    paths = dict(zip(pairs["image_id"], pairs["image_path"], strict=False))
    for shard in index["shards"]:
        for key, members in _members(shards / shard["name"]).items():
            record = json.loads(members["json"])
            assert key == str(record["image_id"])
            (ext,) = set(members) - {"json"}
            assert ext == "png"  # the shapes world's images are PNG files
            # the image file's bytes, as they are
            assert members[ext] == (smoke_data / paths[record["image_id"]]).read_bytes()
            seen_images[record["image_id"]] += 1
            for c in record["captions"]:
                row = pairs[pairs["caption_id"] == c["caption_id"]].iloc[0]
                assert (row["caption"], row["image_id"]) == (c["caption"], record["image_id"])
                seen_captions[c["caption_id"]] += 1
            assert {q["question_id"] for q in record["questions"]} == set(
                vqa[vqa["image_id"] == record["image_id"]]["question_id"]
            )
    assert set(seen_images) == set(pairs["image_id"]) and set(seen_images.values()) == {1}
    assert set(seen_captions) == set(pairs["caption_id"]) and set(seen_captions.values()) == {1}
    assert validate_shards(shards) == index


def test_shards_are_byte_identical_and_replace_only_vlp_output(shards, smoke_data, tmp_path):
    again = tmp_path / "again"
    write_shards(smoke_data, again, samples_per_shard=10, splits=["pretrain", "train"])
    assert (again / "shards.json").read_bytes() == (shards / "shards.json").read_bytes()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by vlp"):
        write_shards(smoke_data, foreign, samples_per_shard=10)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_shard_and_validate(smoke_data, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["shard", "--data", str(smoke_data), "--out", str(out), "--split", "val"]
    assert main([*args, "--samples-per-shard", "3"]) == 0
    assert "3 shards, 8 samples (val: 8 images)" in capsys.readouterr().out
    assert main(["validate", "--data", str(out)]) == 0
    assert main([*args, "--split", "nope"]) == 2
    assert "unknown split 'nope'" in capsys.readouterr().err


def test_truncated_shard_is_named(shards, smoke_cfg, tmp_path):
    copy = _copy(shards, tmp_path)
    bad = copy / "shard-000002.tar"
    bad.write_bytes(bad.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"shard-000002\.tar: .*truncated"):
        validate_shards(copy)
    with pytest.raises(DataError, match=r"shard-000002\.tar"):
        _stream(copy, smoke_cfg)  # the reader checks sizes when it starts
    # truncated and its index edited to match: the tar itself is unreadable
    index = json.loads((copy / "shards.json").read_text())
    index["shards"][2]["bytes"] = 3000
    (copy / "shards.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"shard-000002\.tar: sha256"):
        validate_shards(copy)
    with pytest.raises(DataError, match=r"shard-000002\.tar"):
        list(_stream(copy, smoke_cfg))


def _flip_member(shard: Path, suffix: str) -> None:
    """Flip bytes inside the data of the first member named `*suffix` (size unchanged)."""
    with tarfile.open(shard) as tar:
        info = next(i for i in tar if i.name.endswith(suffix))
    data = bytearray(shard.read_bytes())
    start = info.offset_data + 2
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])
    shard.write_bytes(bytes(data))


def test_flipped_bytes_are_named(shards, smoke_cfg, tmp_path):
    copy = _copy(shards, tmp_path)
    _flip_member(copy / "shard-000003.tar", ".json")
    with pytest.raises(DataError, match=r"shard-000003\.tar: sha256 .* differs"):
        validate_shards(copy)
    with pytest.raises(DataError, match=r"shard-000003\.tar: sample \S+: bad JSON record"):
        list(_stream(copy, smoke_cfg))


def test_count_mismatch_is_named(shards, tmp_path):
    copy = _copy(shards, tmp_path)
    index = json.loads((copy / "shards.json").read_text())
    index["shards"][1]["samples"] = 11
    (copy / "shards.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"shard-000001\.tar: 11 samples but 10 images"):
        validate_shards(copy)


def _edit_index(shard_dir: Path, edit) -> None:
    """Apply `edit` to the index's shard entries, keeping its totals their sums."""
    path = shard_dir / "shards.json"
    index = json.loads(path.read_text())
    edit(index["shards"])
    index["total"] = _totals(index["shards"])
    path.write_text(json.dumps(index))


def _one_more_image(shards: list[dict]) -> None:
    shards[1]["samples"] += 1
    next(iter(shards[1]["splits"].values()))["images"] += 1


def test_an_index_whose_counts_are_not_the_tars_is_refused(shards, smoke_cfg, tmp_path):
    copy = _copy(shards, tmp_path)
    _edit_index(copy, _one_more_image)
    with pytest.raises(DataError, match=r"shard-000001\.tar: holds 10 samples .* records 11"):
        _stream(copy, smoke_cfg)  # the epoch length would come from these counts
    with pytest.raises(DataError, match=r"shard-000001\.tar: holds 10 samples"):
        validate_shards(copy)
    index = json.loads((copy / "shards.json").read_text())
    index["total"]["samples"] += 1
    (copy / "shards.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"shards\.json: total .* is not the sum"):
        _stream(copy, smoke_cfg)


def test_an_index_of_no_shards_is_refused(shards, tmp_path, capsys):
    copy = _copy(shards, tmp_path)
    _edit_index(copy, lambda entries: entries.clear())
    with pytest.raises(DataError, match=r"shards\.json: lists no shards"):
        validate_shards(copy)
    assert main(["validate", "--data", str(copy)]) == 2
    assert "lists no shards" in capsys.readouterr().err


def test_validation_decodes_every_image(shards, tmp_path):
    copy = _copy(shards, tmp_path)
    shard = copy / "shard-000002.tar"
    _flip_member(shard, ".png")  # the PNG signature: not an image any more
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    _edit_index(copy, lambda entries: entries[2].update(sha256=digest))
    with pytest.raises(DataError, match=r"shard-000002\.tar: sample \S+: cannot decode image"):
        validate_shards(copy)


@pytest.mark.parametrize("where", ["data", "data/shards", "."])
def test_shards_overlapping_their_dataset_are_refused(smoke_data, tmp_path, capsys, where):
    data = Path(shutil.copytree(smoke_data, tmp_path / "data"))
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    out = tmp_path / where
    assert main(["shard", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "overlaps the dataset" in err
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_a_shard_directory_that_gained_a_file_is_kept(smoke_data, tmp_path):
    out = tmp_path / "s"
    write_shards(smoke_data, out, splits=["val"])
    (out / "photo.jpg").write_bytes(b"the user's only copy")
    with pytest.raises(OutputError, match=rf"{out}: holds photo\.jpg, which vlp did not write"):
        write_shards(smoke_data, out, splits=["val"])
    assert (out / "photo.jpg").read_bytes() == b"the user's only copy"


def test_an_unwritable_shard_out_is_named(smoke_data, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected\n")
    assert main(["shard", "--data", str(smoke_data), "--out", str(blocker / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write in {blocker}" in err


def test_reader_yields_the_pairs_of_its_splits(shards, smoke_cfg, smoke_data):
    ds = _stream(shards, smoke_cfg, splits=["train"])
    items = list(ds)
    assert len(ds) == 5 * smoke_cfg.data.n_train  # an epoch: as many items as captions
    pairs = read_pairs(smoke_data, "train")
    by_caption = pairs.set_index("caption_id")
    assert sorted(it["image_id"] for it in items) == sorted(pairs["image_id"].unique())
    reference = PairsDataset(smoke_data, "train", image_transforms(smoke_cfg)[0])
    first_row = {r["image_id"]: i for i, r in reversed(list(enumerate(reference._rows)))}
    for it in items:
        row = by_caption.loc[it["caption_id"]]
        assert (row["image_id"], row["caption"]) == (it["image_id"], it["caption"])
        # the same pixels as the Parquet + files layout gives
        assert torch.equal(it["pixel_values"], reference[first_row[it["image_id"]]]["pixel_values"])
    # the batches the training loop gets are those of PairsDataset + its collate
    tok = _Tokenizer()
    batch = make_pretrain_collate(tok, 8)(items[:4])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids"}
    assert batch["pixel_values"].shape == (4, 3, 32, 32)


def test_stream_decodes_an_image_once_for_all_its_captions_and_epochs(
    shards, smoke_cfg, monkeypatch
):
    import vlp.data.shard_stream as shard_stream

    decoded = Counter()

    def counting(data, shard, key, before_load=None):
        decoded[key] += 1
        return open_image(data, shard, key, before_load)

    monkeypatch.setattr(shard_stream, "open_image", counting)
    ds = _stream(shards, smoke_cfg, splits=["train"], resampled=True)
    items = list(ds) + list(ds)  # two epochs of one caption per sample, 5 per image on average
    assert len(items) == 2 * 5 * smoke_cfg.data.n_train
    assert sorted(decoded) == sorted({str(it["image_id"]) for it in items})
    assert set(decoded.values()) == {1}
    # with augmentation every item draws its own crop: decoded each time
    transform, _ = image_transforms(smoke_cfg)
    augment = Augmentation((0.5, 1.0), False, seed=0)
    decoded.clear()
    augmented = ShardPairs(
        shards, ["train"], transform, augment, seed=0, shuffle_buffer=0, resampled=True
    )
    assert len(list(augmented)) == sum(decoded.values())


def test_shards_have_no_pax_headers(shards):
    """A pax header per member would double the tar headers a reader parses."""
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            assert not any(info.pax_headers for info in tar)
        with open(shard, "rb") as f:
            assert f.read(512)[156:157] == b"0"  # the first block is a file, not a pax header


def test_streaming_says_so_once(shards, smoke_cfg, smoke_data, capsys):
    from vlp.data.shard_stream import _say_streaming, pairs_for_training

    _say_streaming.cache_clear()
    transform, _ = image_transforms(smoke_cfg)
    for _ in range(2):
        pairs_for_training(
            smoke_data, str(shards), ["train"], transform, None, seed=0, shuffle_buffer=0
        )
    out = capsys.readouterr().out
    assert out.count("data: streaming pairs of train from") == 1 and str(shards) in out
    pairs_for_training(smoke_data, None, ["train"], transform, None, seed=0, shuffle_buffer=0)
    assert "streaming" not in capsys.readouterr().out


class _Tokenizer:
    """Stand-in for the collate's tokenizer call: one token per word."""

    def __call__(self, texts, **_):
        n = max(len(t.split()) for t in texts)
        ids = torch.tensor([[1] * len(t.split()) + [0] * (n - len(t.split())) for t in texts])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def test_first_caption_only_and_split_filter(shards, smoke_cfg, smoke_data):
    ds = _stream(shards, smoke_cfg, splits=["pretrain"], first_caption_only=True)
    assert len(ds) == smoke_cfg.data.n_pretrain
    firsts = read_pairs(smoke_data, "pretrain").drop_duplicates("image_id")
    assert {(it["image_id"], it["caption_id"]) for it in ds} == set(
        zip(firsts["image_id"], firsts["caption_id"], strict=True)
    )
    with pytest.raises(DataError, match=r"no samples in split\(s\) val; its shards hold"):
        _stream(shards, smoke_cfg, splits=["val"])


def _ids(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["image_id"]]


def test_split_by_worker_covers_every_sample_once(shards, smoke_cfg):
    ds = _stream(shards, smoke_cfg)
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=None)
    ids = [it["image_id"] for it in loader]
    assert len(ids) == read_index(shards)["total"]["samples"]
    assert len(set(ids)) == len(ids)


def test_split_by_node_covers_every_sample_once(shards, smoke_cfg, monkeypatch):
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = DataLoader(_stream(shards, smoke_cfg), batch_size=4, collate_fn=collate)
        per_rank.append(_ids(loader))
    a, b = (set(ids) for ids in per_rank)
    assert not a & b
    assert len(a | b) == sum(map(len, per_rank)) == read_index(shards)["total"]["samples"]


def test_resampled_stream_is_seeded_and_sized(shards, smoke_cfg):
    def epoch(seed: int, n: int, workers: int) -> list[tuple[int, int]]:
        ds = _stream(shards, smoke_cfg, resampled=True, seed=seed, shuffle_buffer=20)
        ds.set_epoch(n, micro_batch_size=8)
        loader = DataLoader(ds, batch_size=8, num_workers=workers, collate_fn=collate)
        return [
            (int(i), int(c))
            for b in loader
            for i, c in zip(b["image_id"], b["caption_id"], strict=True)
        ]

    first = epoch(0, 0, 2)
    n = len(_stream(shards, smoke_cfg))
    assert len(first) >= n // 8 * 8  # at least the batches of one epoch, whole batches only
    assert first == epoch(0, 0, 2)
    assert first != epoch(0, 1, 2) and first != epoch(1, 0, 2)
    assert len({i for i, _ in first}) > n // 5 // 2  # resampling with a buffer mixes images


@pytest.mark.slow
def test_pretraining_from_shards(smoke_cfg, shards, tmp_path, monkeypatch):
    from vlp.pretrain import pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = dataclasses.replace(
        smoke_cfg,
        data=dataclasses.replace(smoke_cfg.data, shards=str(shards), shuffle_buffer=16),
        runtime=dataclasses.replace(
            smoke_cfg.runtime,
            num_workers=1,
            metrics_dir=str(tmp_path / "metrics"),
            plots_dir=str(tmp_path / "plots"),
        ),
        pretrain=dataclasses.replace(smoke_cfg.pretrain, out_dir=str(tmp_path / "pretrained")),
    )
    out = pretrain(cfg)
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert out.is_dir() and any(out.iterdir())
    assert metrics["steps"] == cfg.pretrain.max_steps
    assert metrics["caption_warmup_steps"] == cfg.pretrain.caption_warmup_steps
    assert all(v == v for k, v in metrics.items() if k.startswith("loss"))  # finite, not NaN


class _PixelRegressor(torch.nn.Module):
    """Predicts an image's mean pixel from its pixels, with dropout (resume restores the RNG)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3 * 32 * 32, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)
        )

    def forward(self, pixel_values: torch.Tensor, image_id: torch.Tensor) -> dict:
        x = pixel_values.flatten(1)
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), x.mean(1))
        return {"loss": loss}


def _pixels(items: list[dict]) -> dict[str, torch.Tensor]:
    batch = collate(items)
    return {"pixel_values": batch["pixel_values"], "image_id": batch["image_id"]}


@pytest.mark.slow
def test_training_loop_streams_shards_repeatably_and_resumes(shards, smoke_cfg, tmp_path):
    from tests.train.settings import train_settings
    from vlp.train.checkpoint import list_checkpoints
    from vlp.train.loop import train

    # 120 train captions / batch 8: 15 steps an epoch; the stop at step 17 is mid-epoch
    cfg = train_settings(
        epochs=2, batch_size=8, lr=1e-2, device="cpu", precision="fp32", num_workers=2,
        checkpoint_every=4,
    )  # fmt: skip

    def stream() -> ShardPairs:
        return _stream(shards, smoke_cfg, splits=["train"], resampled=True, shuffle_buffer=16)

    class Stop(RuntimeError):
        pass

    def stop_at_17(metrics: dict, step: int) -> None:
        if step == 17:
            raise Stop

    full, again = _PixelRegressor(), _PixelRegressor()
    ref = train(full, stream(), _pixels, cfg, tmp_path / "full")
    assert ref.steps == 30
    rerun = train(again, stream(), _pixels, cfg, tmp_path / "again")
    assert [h["loss"] for h in rerun.history] == [h["loss"] for h in ref.history]
    with pytest.raises(Stop):
        train(_PixelRegressor(), stream(), _pixels, cfg, tmp_path / "run", on_log=stop_at_17)
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "step-00000016"
    resumed = _PixelRegressor()
    res = train(resumed, stream(), _pixels, cfg, tmp_path / "run", resume=True)
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]
    for (name, a), (_, b) in zip(
        full.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_reads_what_tarfile_reads(shards, tmp_path, fmt):
    from vlp.data.shard_stream import tar_members

    def by_tarfile(path: Path) -> list[tuple[str, bytes]]:
        with tarfile.open(path) as tar:
            return [(i.name, tar.extractfile(i).read()) for i in tar if i.isfile()]

    shard = next(shards.glob("*.tar"))
    assert list(tar_members(str(shard))) == by_tarfile(shard)
    path = tmp_path / "other.tar"
    long = "d" * 90 + "/" + "e" * 80 + ".jpg"  # a ustar prefix, or a long name
    files = [("é.json", b"{}"), (long, b"x" * 700), ("empty.png", b"")]
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float time: pax headers in PAX_FORMAT
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    assert list(tar_members(str(path))) == by_tarfile(path) == files
