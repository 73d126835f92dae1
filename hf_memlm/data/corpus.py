"""Long-document language-modelling data: load documents, then cut each into examples of whole segments.

Memory only helps when a later segment continues an earlier one of the same document, so `pack_documents` never
mixes documents inside an example and keeps the windows of a document in order (`document_index`, `window_index`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .layout import check_positive_int

# extension -> `datasets` packaged builder
CORPUS_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TEXT_COLUMN = "text"


def load_text_corpus(source, text_column: str = TEXT_COLUMN, split: str = "train", streaming: bool = False):
    """Load documents into a `datasets.Dataset` with a single column `"text"` (one row per document).

    Args:
        source: a file (`.txt`: the whole file is one document; `.json`/`.jsonl`/`.parquet`: one document per
            record), a folder (every such file below it, in sorted path order), a list of files/folders, an already
            loaded `datasets.Dataset` or streaming `datasets.IterableDataset` (or a dict of splits), or a Hub
            dataset id (loaded with `datasets.load_dataset(source, split=split, streaming=streaming)`).
        text_column: the column holding the text in json/parquet files or Hub datasets (renamed to `"text"`).
        split: the split to load from a Hub dataset.
        streaming: load files and Hub datasets as a `datasets.IterableDataset`, read as it is iterated (for corpora
            too large to prepare whole). An `IterableDataset` passed in stays one.

    Empty documents are dropped; a corpus with no text left is an error (a stream is read up to its first
    non-empty document to tell).
    """
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

    if isinstance(source, (DatasetDict, IterableDatasetDict)):
        if split not in source:
            raise ValueError(
                f"load_text_corpus: the {type(source).__name__} has no split {split!r}; it has {list(source)}."
            )
        source = source[split]
    if isinstance(source, (Dataset, IterableDataset)):
        origin = f"the given {type(source).__name__}"
        dataset = _keep_text_column(source, text_column, origin)
    elif isinstance(source, (list, tuple)) or _is_local_path(source):
        paths = list(source) if isinstance(source, (list, tuple)) else [source]
        origin = ", ".join(str(path) for path in paths)
        dataset = _load_local_files(_expand_paths(paths), text_column, split, streaming)
    else:
        origin = f"Hub dataset {source!r}"
        dataset = _keep_text_column(_load_hub_dataset(str(source), split, streaming), text_column, origin)
    dataset = dataset.filter(lambda texts: [bool(text) for text in texts], batched=True, input_columns=TEXT_COLUMN)
    if _is_empty(dataset):
        raise ValueError(f"load_text_corpus: the corpus from {origin} is empty: it holds no non-empty text.")
    return dataset


def _is_streaming(dataset) -> bool:
    from datasets import IterableDataset

    return isinstance(dataset, IterableDataset)


def _is_empty(dataset) -> bool:
    """No row (a stream is read up to its first row to tell)."""
    if _is_streaming(dataset):
        return next(iter(dataset.take(1)), None) is None
    return len(dataset) == 0


def _column_names(dataset) -> list[str]:
    """The columns; a stream whose features are not known yet is read up to its first row to tell."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset.take(1)), None)
    return list(first) if first is not None else []


def _is_local_path(source) -> bool:
    """A path-like argument, an existing path, or something that names a supported file, is treated as local."""
    if isinstance(source, os.PathLike) or os.path.exists(source):
        return True
    text = str(source)
    return Path(text).suffix.lower() in CORPUS_BUILDERS or text.startswith((".", "/", "~"))


def _expand_paths(sources) -> list[Path]:
    """Files named directly, plus the supported files inside named folders (sorted, so the order is stable)."""
    files = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_BUILDERS)
            if not found:
                raise ValueError(
                    f"load_text_corpus: the corpus folder {path} has no {'/'.join(CORPUS_BUILDERS)} files in it."
                )
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in CORPUS_BUILDERS:
                raise ValueError(
                    f"load_text_corpus: cannot read {path}: unsupported extension {path.suffix!r}; "
                    f"use one of {', '.join(CORPUS_BUILDERS)}."
                )
            files.append(path)
        else:
            raise FileNotFoundError(f"load_text_corpus: the corpus file {path} does not exist.")
    if not files:
        raise ValueError("load_text_corpus: the list of corpus files is empty; name at least one file or folder.")
    for path in files:
        if path.suffix.lower() in TEXT_SUFFIXES:
            check_utf8_file(path)
    return files


TEXT_SUFFIXES = (".txt", ".json", ".jsonl")  # read as UTF-8 text by their `datasets` builders


def check_utf8_file(path: Path, chunk_size: int = 1 << 20) -> None:
    """Raise a ValueError naming `path`, the first byte that is not UTF-8 and its offset (the `datasets`
    builders only say that generating the dataset failed, without naming the file)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                # error.start counts from the bytes the decoder still held plus this chunk
                held = len(error.object) - len(chunk)
                position = offset - held + error.start
                raise ValueError(
                    f"load_text_corpus: {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                    f"{position}); convert it first, e.g. `iconv -f latin1 -t utf-8`."
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def _load_local_files(files: list[Path], text_column: str, split: str, streaming: bool = False):
    """Load runs of files of the same kind with one builder each; keep the file order across kinds."""
    from datasets import concatenate_datasets, load_dataset

    parts, run = [], []
    for path in files + [None]:
        builder = CORPUS_BUILDERS[path.suffix.lower()] if path is not None else None
        if run and (path is None or builder != CORPUS_BUILDERS[run[0].suffix.lower()]):
            run_builder = CORPUS_BUILDERS[run[0].suffix.lower()]
            options = {"sample_by": "document"} if run_builder == "text" else {}  # a .txt file is one document
            data_files = {split: [str(p) for p in run]}
            loaded = load_dataset(run_builder, data_files=data_files, split=split, streaming=streaming, **options)
            column = TEXT_COLUMN if run_builder == "text" else text_column
            parts.append(_keep_text_column(loaded, column, ", ".join(str(p) for p in run)))
            run = []
        if path is not None:
            run.append(path)
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _load_hub_dataset(name: str, split: str, streaming: bool = False):
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split, **({"streaming": True} if streaming else {}))
    except Exception as error:  # the datasets library raises many kinds; say what was tried
        raise ValueError(
            f"load_text_corpus: {name!r} is not a local file or folder, and loading it as a Hub dataset "
            f"(split={split!r}, streaming={streaming}) failed: {error}"
        ) from error


def _keep_text_column(dataset, text_column: str, origin: str):
    columns = _column_names(dataset)
    if text_column not in columns:
        raise ValueError(
            f"load_text_corpus: {origin} has no column {text_column!r}; its columns are {columns}. "
            "Pass text_column= to name the one holding the text."
        )
    dataset = dataset.select_columns([text_column])
    return dataset.rename_column(text_column, TEXT_COLUMN) if text_column != TEXT_COLUMN else dataset


def pack_documents(dataset, tokenizer, segment_length: int, num_segments: int, text_column: str = TEXT_COLUMN):
    """Tokenize documents and cut each into consecutive windows of `num_segments * segment_length` tokens.

    Each example holds tokens of one document only, windows follow the document's order, and the document's last
    partial window is dropped (examples are never padded). Documents shorter than one window give no example.

    Returns a `datasets.Dataset` with columns `input_ids`, `labels` (a copy of `input_ids`; the model shifts),
    `document_index` (row of the document in `dataset`) and `window_index` (0, 1, ... within the document; window
    `w` starts at token `w * num_segments * segment_length` of the document).

    A streaming `datasets.IterableDataset` gives an `IterableDataset` of the same examples, tokenized and cut as
    they are read (train on it with the Trainer's `max_steps`); it is read up to its first example here, to tell
    that there is one.
    """
    check_positive_int("segment_length", segment_length)
    check_positive_int("num_segments", num_segments)
    columns = _column_names(dataset)
    if text_column not in columns:
        raise ValueError(f"pack_documents: the dataset has no column {text_column!r}; its columns are {columns}.")
    if _is_empty(dataset):
        raise ValueError("pack_documents: the dataset is empty; load some documents first (load_text_corpus).")
    window = segment_length * num_segments
    streaming = _is_streaming(dataset)

    def tokenize(texts):
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": ids, "num_tokens": [len(row) for row in ids]}

    def cut_into_windows(ids_batch, document_indices):
        columns = {"input_ids": [], "labels": [], "document_index": [], "window_index": []}
        for ids, document in zip(ids_batch, document_indices):
            for window_number in range(len(ids) // window):
                tokens = ids[window_number * window : (window_number + 1) * window]
                columns["input_ids"].append(tokens)
                columns["labels"].append(list(tokens))
                columns["document_index"].append(document)
                columns["window_index"].append(window_number)
        return columns

    if streaming:
        return _pack_stream(dataset, columns, text_column, tokenize, cut_into_windows, window)
    tokenized = dataset.map(
        tokenize, batched=True, input_columns=text_column, remove_columns=columns, desc="Tokenizing"
    )
    longest = max(tokenized["num_tokens"])
    if longest < window:
        raise ValueError(
            f"pack_documents: all {len(tokenized)} documents are too short: the longest has {longest} tokens, but one "
            f"example needs num_segments * segment_length = {num_segments} * {segment_length} = {window} tokens. "
            "Use longer documents, fewer segments or a shorter segment_length."
        )
    return tokenized.map(
        cut_into_windows,
        batched=True,
        with_indices=True,
        input_columns="input_ids",
        remove_columns=tokenized.column_names,
        desc="Packing",
    )


def _pack_stream(dataset, columns, text_column, tokenize, cut_into_windows, window):
    """`pack_documents` of a stream: the same two maps, run lazily, with the output features declared (the
    Trainer reads a dataset's column names)."""
    from datasets import Features, List, Value

    tokens = List(Value("int64"))
    tokenized = dataset.map(
        tokenize,
        batched=True,
        input_columns=text_column,
        remove_columns=columns,
        features=Features({"input_ids": tokens, "num_tokens": Value("int64")}),
    )
    packed = tokenized.map(
        cut_into_windows,
        batched=True,
        with_indices=True,
        input_columns="input_ids",
        remove_columns=["input_ids", "num_tokens"],
        features=Features(
            {"input_ids": tokens, "labels": tokens, "document_index": Value("int64"), "window_index": Value("int64")}
        ),
    )
    if _is_empty(packed):
        raise ValueError(
            f"pack_documents: no document of the stream is long enough: one example needs num_segments * "
            f"segment_length = {window} tokens. Use longer documents, fewer segments or a shorter segment_length."
        )
    return packed
