"""`vlp validate`: Great Expectations suites over the manifests and the images they name.

Checks computed per row in pandas (does the image exist and decode, in how many splits
does it occur) become extra columns that GX expectations then judge, so every check
shows up in one GX report (Data Docs) and one readable error message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from vlp.config import Config, ValidateConfig
from vlp.data.manifest import (
    ANSWER_TYPES,
    ANSWERS_PER_QUESTION,
    PAIRS_FILE,
    PAIRS_SCHEMA,
    SHARD_INDEX_FILE,
    SPLITS,
    VQA_FILE,
    VQA_SCHEMA,
    image_roots,
    locate_image,
)
from vlp.errors import DataError, OutputError
from vlp.io import atomic_dir, atomic_write_json

DOCS_SITE = "vlp"
DATASETS_REPORT_DIR = "datasets"  # validate.report_dir/datasets/<name>/: `vlp validate --data DIR`
_MAX_EXAMPLES = 5

# Derived columns: name -> what a failing value means, for the error message.
_DERIVED = {
    "image_problem": "image file is missing, corrupt, out of bounds or outside the data root",
    "n_splits_of_image": "image occurs in more than one split",
    "image_splits": "splits of the image",
    "n_paths_of_image_id": "image_id names more than one image_path",
    "n_answers": f"question does not have exactly {ANSWERS_PER_QUESTION} answers",
}


@dataclass
class Failure:
    """One failed expectation: where, what, how many rows, a few offending examples."""

    manifest: str
    expectation: str
    column: str | None
    unexpected_count: int
    examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        col = f"({self.column})" if self.column else ""
        what = _DERIVED.get(self.column or "", "")
        head = f"{self.manifest}: {self.expectation}{col}"
        if what:
            head += f" [{what}]"
        if self.unexpected_count:
            head += f": {self.unexpected_count} row(s)"
        return head + "".join(f"\n      {e}" for e in self.examples)


def _image_problem(
    data_dir: Path, rel: Any, vcfg: ValidateConfig, roots: tuple[Path, ...]
) -> str | None:
    """Why the image at a manifest path is unusable, or None if it is fine.

    The size the header declares is checked before decoding, so a decompression bomb
    is reported, never decoded.
    """
    try:
        path = locate_image(data_dir, rel, roots)
    except DataError as e:
        return str(e)
    if not path.is_file():
        return f"{rel}: file not found"
    lo, hi = vcfg.min_image_side, vcfg.max_image_side
    try:
        with Image.open(path) as img:
            w, h = img.size
            if not (lo <= w <= hi and lo <= h <= hi):
                return f"{rel}: size {w}x{h} outside [{lo}, {hi}]"
            img.load()  # a full decode: truncated or corrupt files fail here
    except Image.DecompressionBombError as e:  # PIL refuses to even open it
        return f"{rel}: image too large to open ({e})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{rel}: cannot decode image ({e})"
    return None


def _add_derived_columns(
    frames: dict[str, pd.DataFrame], data_dir: Path, vcfg: ValidateConfig
) -> None:
    """Per-row image checks and split-leak counts, across all manifests together."""
    located = [
        df[["image_id", "image_path", "split"]]
        for df in frames.values()
        if {"image_id", "image_path", "split"} <= set(df.columns)
    ]
    both = pd.concat(located, ignore_index=True) if located else pd.DataFrame()
    if not both.empty:
        both = both.astype({"image_path": str, "split": str})
        splits_by_path = both.groupby("image_path")["split"].agg(lambda s: sorted(set(s)))
        splits_by_id = both.groupby("image_id")["split"].agg(lambda s: sorted(set(s)))
        paths_by_id = both.groupby("image_id")["image_path"].nunique()
    problems: dict[Any, str | None] = {}
    roots = image_roots(data_dir)
    for df in frames.values():
        if "image_path" in df.columns:
            for rel in df["image_path"].unique():
                if rel not in problems:
                    problems[rel] = _image_problem(data_dir, rel, vcfg, roots)
            df["image_problem"] = df["image_path"].map(problems)
        if not both.empty and {"image_id", "image_path", "split"} <= set(df.columns):
            sp = df["image_path"].astype(str).map(splits_by_path)
            si = df["image_id"].map(splits_by_id)
            merged = [sorted(set(a) | set(b)) for a, b in zip(sp, si, strict=True)]
            df["image_splits"] = [",".join(m) for m in merged]
            df["n_splits_of_image"] = [len(m) for m in merged]
            df["n_paths_of_image_id"] = df["image_id"].map(paths_by_id).astype("int64")
        if "answers" in df.columns:
            df["n_answers"] = df["answers"].map(
                lambda a: -1 if a is None or isinstance(a, str) else len(a)
            )


def _suite_expectations(
    schema: dict[str, str], df: pd.DataFrame, vcfg: ValidateConfig, id_col: str
) -> list[Any]:
    import great_expectations.expectations as gxe

    present = set(df.columns)
    exps: list[Any] = [gxe.ExpectTableColumnsToMatchSet(column_set=list(schema), exact_match=False)]
    for col, dtype in schema.items():
        if col not in present:
            continue
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
        if dtype in ("int64", "str"):
            exps.append(gxe.ExpectColumnValuesToBeOfType(column=col, type_=dtype))
    if id_col in present:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column=id_col))
    if {"image_id", "caption"} <= present:
        # one pair in two rows (imported twice under two ids) would count twice in training
        # and in recall's captions per image
        exps.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=["image_id", "caption"]))
    if "split" in present:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    for text in ("caption", "question"):
        if text in present:
            exps.append(
                gxe.ExpectColumnValueLengthsToBeBetween(
                    column=text, min_value=vcfg.min_caption_chars, max_value=vcfg.max_caption_chars
                )
            )
            exps.append(gxe.ExpectColumnValuesToMatchRegex(column=text, regex=r"\w"))
    if "answer_type" in present:
        exps.append(
            gxe.ExpectColumnValuesToBeInSet(column="answer_type", value_set=list(ANSWER_TYPES))
        )
    if "n_answers" in present:
        exps.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="n_answers", min_value=ANSWERS_PER_QUESTION, max_value=ANSWERS_PER_QUESTION
            )
        )
    if "image_path" in present:
        # Lexical guard as in the torch datasets: no absolute paths, no `..` components.
        exps.append(
            gxe.ExpectColumnValuesToNotMatchRegexList(
                column="image_path", regex_list=[r"^/", r"^[A-Za-z]:", r"(?:^|/)\.\.(?:/|$)", r"\\"]
            )
        )
    if "image_problem" in present:
        exps.append(gxe.ExpectColumnValuesToBeNull(column="image_problem"))
    if "n_splits_of_image" in present:
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="n_splits_of_image", max_value=1))
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="n_paths_of_image_id", max_value=1))
    return exps


def _context() -> Any:
    """One ephemeral GX context: in-memory stores, no analytics, no progress bars."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _build_docs(context: Any, docs_dir: Path) -> None:
    """Render the context's validation results as Data Docs HTML, replacing docs_dir."""
    with atomic_dir(docs_dir, "data-docs") as tmp:
        site = {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(tmp.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
        context.add_data_docs_site(site_name=DOCS_SITE, site_config=site)
        context.build_data_docs(site_names=[DOCS_SITE])


def _show(value: Any) -> str:
    return repr(value.item() if isinstance(value, np.generic) else value)


def _example(df: pd.DataFrame, idx: Any, id_col: str, column: str | None) -> str:
    row = df.loc[idx]
    parts = [f"row {idx}"]
    for col in (id_col, "image_path", "split"):
        if col in df.columns and col != column:
            parts.append(f"{col}={_show(row[col])}")
    if column == "n_splits_of_image":
        parts.append(f"image in splits {row['image_splits']}")
    elif column == "image_problem":
        parts.append(str(row[column]))
    elif column == "n_answers":
        parts.append(f"{row[column]} answers")
    elif column is not None and column in df.columns:
        parts.append(f"{column}={_show(row[column])}")
    return " ".join(parts)


def _failures(name: str, df: pd.DataFrame, result: Any, id_col: str) -> list[Failure]:
    out = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        column = cfg.kwargs.get("column")
        res = r.result or {}
        examples: list[str] = []
        if res.get("unexpected_index_list"):
            seen: set[str] = set()
            for idx in res["unexpected_index_list"]:
                # image-level problems repeat on every caption row: show distinct files
                key = str(df.loc[idx, "image_path"]) if column in _DERIVED else str(idx)
                if "image_path" not in df.columns:
                    key = str(idx)
                if key in seen:
                    continue
                seen.add(key)
                examples.append(_example(df, idx, id_col, column))
                if len(examples) == _MAX_EXAMPLES:
                    break
        elif "details" in res:
            examples.append(f"{res['details']}")
        elif r.exception_info and r.exception_info.get("raised_exception"):
            examples.append(f"could not evaluate: {r.exception_info.get('exception_message')}")
        out.append(Failure(name, cfg.type, column, int(res.get("unexpected_count") or 0), examples))
    return out


def _read_frames(data_dir: Path) -> dict[str, pd.DataFrame]:
    frames = {}
    for name in (PAIRS_FILE, VQA_FILE):
        path = data_dir / name
        if not path.exists():
            continue
        try:
            frames[name] = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    if not frames:
        raise DataError(f"{data_dir}: no manifest ({PAIRS_FILE} or {VQA_FILE}) found")
    return frames


def validate_dataset(
    data_dir: Path,
    vcfg: ValidateConfig,
    docs_dir: Path | None = None,
    docs_on_success: bool = True,
) -> dict[str, Any]:
    """Run the suites on every manifest of data_dir; returns a JSON-able summary.

    `summary["failures"]` lists readable lines (empty when everything passed). With
    `docs_dir`, GX Data Docs HTML of the run replaces that directory (on success too
    unless `docs_on_success` is False); if that directory cannot be written,
    `summary["docs_error"]` says why and the findings are returned all the same.
    """
    import great_expectations as gx

    data_dir = Path(data_dir)
    frames = _read_frames(data_dir)
    _add_derived_columns(frames, data_dir, vcfg)
    context = _context()
    source = context.data_sources.add_pandas("manifests")
    failures: list[Failure] = []
    summary: dict[str, Any] = {"data_dir": str(data_dir), "manifests": {}}
    evaluated = 0
    for name, df in frames.items():
        schema, id_col = (
            (PAIRS_SCHEMA, "caption_id") if name == PAIRS_FILE else (VQA_SCHEMA, "question_id")
        )
        stem = name.removesuffix(".parquet")
        batch_def = source.add_dataframe_asset(stem).add_batch_definition_whole_dataframe("all")
        # the whole suite at once: each add_expectation on a stored suite re-serialises it
        suite = context.suites.add(
            gx.ExpectationSuite(
                name=f"{stem}_manifest", expectations=_suite_expectations(schema, df, vcfg, id_col)
            )
        )
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=stem, data=batch_def, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": df}, result_format={"result_format": "COMPLETE"}
        )
        found = _failures(name, df, result, id_col)
        failures.extend(found)
        evaluated += len(result.results)
        splits = df["split"].astype(str).value_counts().sort_index() if "split" in df else {}
        summary["manifests"][name] = {
            "rows": int(len(df)),
            "images": int(df["image_path"].nunique()) if "image_path" in df else 0,
            "rows_per_split": {str(k): int(v) for k, v in dict(splits).items()},
            "expectations": len(result.results),
            "failed": len(found),
        }
    summary.update(
        success=not failures,
        expectations=evaluated,
        failed_expectations=len(failures),
        failures=[f.line() for f in failures],
    )
    if docs_dir is not None and (failures or docs_on_success):
        try:
            _build_docs(context, docs_dir)
        except (OSError, OutputError) as e:
            summary["docs_error"] = _write_error(docs_dir, e)
    return summary


def _write_error(path: Path, e: OSError | OutputError) -> str:
    why = e if isinstance(e, OutputError) else e.strerror or e
    return f"cannot write the report to {path} ({why})"


def _error_message(summary: dict[str, Any], docs: Path | None) -> str:
    lines = [
        f"{summary['data_dir']}: {summary['failed_expectations']} of "
        f"{summary['expectations']} expectations failed"
    ]
    lines += [f"  - {line}" for line in summary["failures"]]
    if "docs_error" in summary:
        lines.append(f"  report: {summary['docs_error']}")
    elif docs is not None:
        lines.append(f"  report: {docs / 'index.html'}")
    return "\n".join(lines)


def validate_stage(cfg: Config, data_dir: Path | None) -> dict[str, Any]:
    """`vlp validate`: validate data_dir (default cfg.data.root); DataError listing failures.

    As the pipeline stage (no data_dir) it always writes `summary.json` and Data Docs
    (`data_docs/`) to `cfg.validate.report_dir`. With an explicit data_dir, Data Docs and the
    summary go to `<report_dir>/datasets/<DIR's name>/`, only on failure. Nothing is ever
    written into the dataset. The findings are reported even when the report cannot be
    written (OutputError if the data passed, one more line of the DataError otherwise).
    A `vlp shard` directory is checked against its index instead (`validate_shards`).
    """
    if data_dir is not None and (Path(data_dir) / SHARD_INDEX_FILE).is_file():
        from vlp.data.shards import validate_shards  # every shard against its index

        total = validate_shards(data_dir)["total"]
        print(f"vlp validate: {data_dir}: {total['shards']} shards, {total['samples']} samples ok")
        return {"success": True, "shards": total}
    if data_dir is None:
        target, report_dir = Path(cfg.data.root), Path(cfg.validate.report_dir)
        docs_dir, on_success = report_dir / "data_docs", True
    else:
        target = Path(data_dir)
        name = target.resolve().name or "root"
        report_dir = docs_dir = Path(cfg.validate.report_dir) / DATASETS_REPORT_DIR / name
        on_success = False
    if not target.is_dir():
        raise DataError(
            f"{target}: dataset directory not found (run `vlp generate` or `vlp import`)"
        )
    summary = validate_dataset(target, cfg.validate, docs_dir, docs_on_success=on_success)
    wrote = on_success or not summary["success"]
    if wrote and "docs_error" not in summary:
        try:
            atomic_write_json(report_dir / "summary.json", summary)
        except OSError as e:
            summary["docs_error"] = _write_error(report_dir, e)
    passed = summary["expectations"] - summary["failed_expectations"]
    sizes = "".join(
        f"; {name}: {m['rows']} rows, {m['images']} images"
        for name, m in summary["manifests"].items()
    )
    print(f"vlp validate: {target}: {passed}/{summary['expectations']} expectations passed{sizes}")
    if not summary["success"]:
        raise DataError(_error_message(summary, docs_dir if wrote else None))
    if "docs_error" in summary:
        raise OutputError(summary["docs_error"])
    return summary
