"""Public recommendation datasets -> standard event logs -> the NVTabular session workflow.

Every loader reads the files as they are published (plain or compressed .xz/.gz/.bz2), checks what it reads
(field count, integer ids, rating scale, known row/user/item counts) and returns a `LoadedDataset`:

    events       DataFrame, one row per interaction, in file order:
                     user_id    int64 (Amazon ratings: str)
                     item_id    int64 (Amazon ratings: str)
                     rating     int64, or float64 where the scale has half stars (ML-20M / ml-latest)
                     timestamp  int64 unix seconds
                 Datasets without ratings or timestamps (S3-Rec sequences) simply lack those columns.
    candidates   the raw item ids a model must score and draw negatives from (sorted), or None = every item
                 the workflow encodes (Categorify datasets)
    item_encoding, min_length   how `preprocess_dataset` runs the session workflow for this data

The protocol follows the reference (reference-hstu.md section 1.1 and 10):

* MovieLens keeps RAW movie ids (no Categorify): the embedding table has max id + 1 rows and the candidate /
  negative pool is the whole catalogue file (ML-1M: all 3,883 movies.dat ids, although only 3,706 are rated).
  No interaction filter (every MovieLens user has >= 20 ratings).
* Amazon Books (ratings-only csv): count every item's and every user's ratings on the raw file, keep rows
  whose item AND user have >= 5 (one pass, so a kept user may end with fewer than 5), then drop sequences
  shorter than 5 (the workflow's min_length, counted before truncation). Ids are categorified; the pool is
  every item that survives the count filter (the reference asserts 695,762 for ratings_Books.csv), including
  items seen only by the users the length filter drops: Categorify is fitted on every event, as the
  reference's cat.codes are computed before that filter.
* Amazon S3-Rec sequence files (`user item item ...`, already chronological, ids 1..N, no timestamps): the
  output has no timestamp column, so a model's time bias must switch off; the list order is kept.

Ties: events are ordered by a STABLE sort on timestamp (equal times keep file order). The reference sorts with
pandas' default quicksort, which is not stable, so its order among tied timestamps is arbitrary; ours differs
from it only there.

`preprocess_dataset(name, input, output)` = load + `session_workflow.preprocess` with the dataset's encoding,
candidate pool and min_length; `DATASETS` lists the names (`dataset_names()`).
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from merlin_hstu.common import schema as roles
from merlin_hstu.workflows.session_workflow import (
    ORIGIN_ATTR,
    EventLogError,
    LogOrigin,
    ProcessedDataset,
    SessionWorkflowConfig,
    preprocess,
)

PathLike = Union[str, os.PathLike]

USER, ITEM, RATING, TIME = roles.LOG_USER_ID, roles.LOG_ITEM_ID, roles.LOG_RATING, roles.LOG_TIMESTAMP
COMPRESSIONS = ("", ".xz", ".gz", ".bz2")  # looked up in this order: a decompressed copy wins
_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}

#: the workflow keeps this many most recent events by default: 200 history items (the reference's window)
#: + the train target s_{T-1} + the eval target s_T, so both leave-one-out samples are exact.
DEFAULT_MAX_LENGTH = 202


class DatasetFormatError(EventLogError):
    """A dataset file is missing or is not what the dataset says; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------------------
# result types and registry
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpectedCounts:
    """Published sizes of a dataset file; None = not known. Checked by `load_dataset(check_counts=True)`."""

    events: Optional[int] = None
    users: Optional[int] = None
    items: Optional[int] = None  # distinct items in the (filtered) log
    candidates: Optional[int] = None  # catalogue size
    max_item_id: Optional[int] = None  # largest raw item id (raw-id datasets)


@dataclass
class LoadedDataset:
    """A dataset read into the standard event-log form, plus how it must be preprocessed."""

    name: str
    events: pd.DataFrame  # user_id, item_id, [rating], [timestamp]
    candidates: Optional[np.ndarray]  # sorted raw catalogue ids; None = every item the workflow encodes
    item_encoding: str  # "raw" | "categorify" (SessionWorkflowConfig.item_encoding)
    min_length: int  # sequences with fewer events are dropped by the workflow
    files: Tuple[Path, ...]
    expected: Optional[ExpectedCounts] = None
    user_features: Optional[pd.DataFrame] = None  # e.g. ML-1M users.dat (not used by the workflow)
    item_features: Optional[pd.DataFrame] = None  # e.g. titles and genres of the catalogue
    filter_counts: Dict[str, int] = field(default_factory=dict)  # rows/users/items before and after filters

    @property
    def has_timestamps(self) -> bool:
        return TIME in self.events.columns

    def workflow_config(self, max_length: int = DEFAULT_MAX_LENGTH) -> SessionWorkflowConfig:
        """The session-workflow settings of this dataset (no actions; time order only if timestamps exist)."""
        return SessionWorkflowConfig(
            id_column=USER,
            id_kind="user",
            item_column=ITEM,
            action_column=None,
            timestamp_column=TIME if self.has_timestamps else None,
            max_length=max_length,
            min_length=self.min_length,
            item_encoding=self.item_encoding,
        )


Loader = Callable[[Path], LoadedDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset: what files it needs, where they come from, and its loader."""

    name: str
    description: str
    files: Tuple[str, ...]  # file names inside the input directory (each may also end in .xz/.gz/.bz2)
    source: str  # where to get the files
    loader: Loader
    expected: Optional[ExpectedCounts] = None
    staged: Optional[str] = None  # folder under shared/data holding a copy, if one is staged

    def load(self, input_path: PathLike, check_counts: bool = True) -> LoadedDataset:
        loaded = self.loader(Path(input_path))
        loaded.expected = loaded.expected or self.expected
        if check_counts and loaded.expected is not None:
            check_expected_counts(loaded, loaded.expected)
        return loaded


# ---------------------------------------------------------------------------------------------------------
# file helpers
# ---------------------------------------------------------------------------------------------------------
def locate(input_path: Path, filename: str, dataset: str) -> Path:
    """`filename` (or its .xz/.gz/.bz2 copy) in the directory `input_path`; a file path is returned as is."""
    if input_path.is_file():
        return input_path
    if not input_path.is_dir():
        raise DatasetFormatError(f"{dataset}: input {str(input_path)!r} does not exist")
    for suffix in COMPRESSIONS:
        candidate = input_path / f"{filename}{suffix}"
        if candidate.is_file():
            return candidate
    present = sorted(p.name for p in input_path.iterdir())
    raise DatasetFormatError(
        f"{dataset}: {filename!r} (or {filename}.xz/.gz/.bz2) not found in {str(input_path)!r} "
        f"(it holds {present[:12]}{' ...' if len(present) > 12 else ''}). Fix: point --input at the directory "
        f"holding the dataset's files: {filename}."
    )


def _open_text(path: Path, encoding: str):
    opener = _OPENERS.get(path.suffix.lower())
    if opener is None:
        return open(path, "r", encoding=encoding, newline="")
    return io.TextIOWrapper(opener(path, "rb"), encoding=encoding, newline="")


def _lines(path: Path, encoding: str) -> Iterator[Tuple[int, str]]:
    """(1-based line number, line without its line ending); blank lines are skipped."""
    with _open_text(path, encoding) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _first_line(path: Path, encoding: str) -> str:
    for _, line in _lines(path, encoding):
        return line
    raise DatasetFormatError(f"{path}: the file is empty")


def _line_at(path: Path, number: int, encoding: str) -> str:
    """Line `number` (1-based) of the file, for error messages."""
    with _open_text(path, encoding) as handle:
        for current, line in enumerate(handle, start=1):
            if current == number:
                return line.rstrip("\r\n")[:120]
    return ""


def _separator_hint(line: str) -> str:
    found = [name for sep, name in (("::", "'::'"), ("\t", "TAB"), (",", "','"), ("|", "'|'"), (";", "';'"))
             if sep in line]
    return f" (the line contains {', '.join(found)}: is this another dataset's file?)" if found else ""


def _split_fields(path: Path, sep: str, fields: Sequence[str], encoding: str) -> Iterator[Tuple[int, List[str]]]:
    """Split every line on `sep`, requiring exactly len(fields) fields (small catalogue files)."""
    for number, line in _lines(path, encoding):
        parts = line.split(sep)
        if len(parts) != len(fields):
            raise DatasetFormatError(
                f"{path}, line {number}: expected {len(fields)} {sep!r}-separated fields "
                f"({', '.join(fields)}), found {len(parts)}: {line[:120]!r}{_separator_hint(line)}"
            )
        yield number, parts


def _as_int(value: str, path: Path, number: int, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetFormatError(
            f"{path}, line {number}: {name} must be an integer, got {value!r}"
        ) from None


def _integer_column(values: pd.Series, path: Path, name: str, first_line: int) -> np.ndarray:
    """int64 values of a parsed column, or an error naming the first line whose value is not an integer."""
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.to_numpy(dtype=np.int64)
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna().to_numpy() | ~np.isclose(numeric.fillna(0).to_numpy(float) % 1, 0)
    if bad.any():
        row = int(np.argmax(bad))
        raise DatasetFormatError(
            f"{path}, line {row + first_line}: {name} must be an integer, got {values.iloc[row]!r}"
            f"{_separator_hint(str(values.iloc[row]))}"
        )
    # integral floats (e.g. a column with '.0'): exact as long as they stay below 2**53
    return numeric.to_numpy(dtype=np.float64).astype(np.int64)


def _number_column(values: pd.Series, path: Path, name: str, first_line: int) -> np.ndarray:
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise DatasetFormatError(f"{path}, line {row + first_line}: {name} must be a number, got {values.iloc[row]!r}")
    return numeric.to_numpy(dtype=np.float64)


def _ratings(values: np.ndarray, path: Path, low: float, high: float, step: float, first_line: int) -> np.ndarray:
    """Check the rating scale; int64 when every rating is whole, else float64 (half stars), never rounded."""
    scaled = values / step
    bad = (values < low) | (values > high) | (scaled != np.round(scaled))
    if bad.any():
        row = int(np.argmax(bad))
        raise DatasetFormatError(
            f"{path}, line {row + first_line}: rating {values[row]!r} is outside the dataset's scale "
            f"{low:g}..{high:g} in steps of {step:g}; is this the right file, with columns in the documented order?"
        )
    whole = np.all(values == np.round(values))
    return values.astype(np.int64) if whole else values.astype(np.float64)


def _timestamps(values: np.ndarray, path: Path, first_line: int) -> np.ndarray:
    bad = values < 0
    if bad.any():
        row = int(np.argmax(bad))
        raise DatasetFormatError(f"{path}, line {row + first_line}: negative timestamp {values[row]}")
    return values


def _read_table(path: Path, sep: str, fields: Sequence[str], header: Optional[Sequence[str]],
                encoding: str, dtype=None) -> pd.DataFrame:
    """Parse a single-character-separated table with exactly len(fields) fields per line.

    With `header`, the file's first line must be exactly those names; without it, every line is data.
    """
    first = _first_line(path, encoding)
    n_first = len(first.split(sep))
    if n_first != len(fields):
        raise DatasetFormatError(
            f"{path}, line 1: expected {len(fields)} {sep!r}-separated fields ({', '.join(fields)}), found "
            f"{n_first}: {first[:120]!r}{_separator_hint(first)}"
        )
    if header is not None and [c.strip() for c in first.split(sep)] != list(header):
        raise DatasetFormatError(
            f"{path}, line 1: expected the header {sep.join(header)!r}, found {first[:120]!r}"
        )
    try:
        df = pd.read_csv(path, sep=sep, header=0 if header is not None else None, encoding=encoding,
                         dtype=dtype, skip_blank_lines=True, keep_default_na=False, na_values=[""])
    except pd.errors.ParserError as error:
        raise DatasetFormatError(
            f"{path}: {error}".strip() + f" (expected {len(fields)} {sep!r}-separated fields per line: "
            f"{', '.join(fields)})"
        ) from None
    df.columns = list(fields)
    first_data_line = 2 if header is not None else 1
    for name in fields:
        missing = df[name].isna().to_numpy()
        if missing.any():
            row = int(np.argmax(missing))
            raise DatasetFormatError(
                f"{path}, line {row + first_data_line}: field {name!r} is empty or missing "
                f"(expected {len(fields)} {sep!r}-separated fields per line: {', '.join(fields)})"
            )
    return df


def _read_double_colon(path: Path, fields: Sequence[str], encoding: str = "latin-1") -> pd.DataFrame:
    """A MovieLens `::`-separated file with numeric fields (ratings.dat), parsed fast with the C reader.

    pandas' C parser takes one-character separators only, so the line is split on ':'; the n real fields
    are then at even positions and the odd positions must be empty. A ':' elsewhere fails that check.
    """
    first = _first_line(path, encoding)
    n_first = len(first.split("::"))
    if n_first != len(fields):
        raise DatasetFormatError(
            f"{path}, line 1: expected {len(fields)} '::'-separated fields ({', '.join(fields)}), found "
            f"{n_first}: {first[:120]!r}{_separator_hint(first)}"
        )
    width = 2 * len(fields) - 1
    try:
        df = pd.read_csv(path, sep=":", header=None, names=list(range(width)), encoding=encoding,
                         keep_default_na=False, na_values=[""])
    except pd.errors.ParserError as error:
        # the C parser counts ':'-fields; translate "Expected 7 fields in line 5, saw 9" back to '::' fields
        found = re.search(r"line (\d+), saw (\d+)", str(error))
        where = f"line {found.group(1)}: found {(int(found.group(2)) + 1) // 2}" if found else f"{error}".strip()
        raise DatasetFormatError(
            f"{path}, {where}; expected {len(fields)} '::'-separated fields per line ({', '.join(fields)})"
        ) from None
    gaps = df[list(range(1, width, 2))].notna().any(axis=1).to_numpy()
    short = df[list(range(0, width, 2))].isna().any(axis=1).to_numpy()
    bad = gaps | short
    if bad.any():
        row = int(np.argmax(bad))
        raise DatasetFormatError(
            f"{path}, line {row + 1}: expected {len(fields)} '::'-separated fields ({', '.join(fields)}), "
            f"found {_line_at(path, row + 1, encoding)!r}"
        )
    out = df[list(range(0, width, 2))]
    out.columns = list(fields)
    return out


# ---------------------------------------------------------------------------------------------------------
# readers (one file each)
# ---------------------------------------------------------------------------------------------------------
def _event_frame(users, items, ratings=None, times=None) -> pd.DataFrame:
    columns = {USER: users, ITEM: items}
    if ratings is not None:
        columns[RATING] = ratings
    if times is not None:
        columns[TIME] = times
    return pd.DataFrame(columns)


def read_movielens_dat_ratings(path: Path) -> pd.DataFrame:
    """ML-1M / ML-10M `ratings.dat`: UserID::MovieID::Rating::Timestamp (ratings 1..5 whole stars)."""
    fields = ("UserID", "MovieID", "Rating", "Timestamp")
    df = _read_double_colon(path, fields)
    return _event_frame(
        _integer_column(df["UserID"], path, "UserID", 1),
        _integer_column(df["MovieID"], path, "MovieID", 1),
        _ratings(_number_column(df["Rating"], path, "Rating", 1), path, 1, 5, 1, 1),
        _timestamps(_integer_column(df["Timestamp"], path, "Timestamp", 1), path, 1),
    )


def read_movielens_dat_movies(path: Path) -> pd.DataFrame:
    """ML-1M `movies.dat` (latin-1): MovieID::Title::Genres -> item_id, title, genres."""
    rows = [
        (_as_int(parts[0], path, number, "MovieID"), parts[1], parts[2])
        for number, parts in _split_fields(path, "::", ("MovieID", "Title", "Genres"), "latin-1")
    ]
    return _catalogue_frame(rows, ("title", "genres"), path)


def read_movielens_dat_users(path: Path) -> pd.DataFrame:
    """ML-1M `users.dat`: UserID::Gender::Age::Occupation::Zip-code (kept as read; not a workflow input)."""
    fields = ("UserID", "Gender", "Age", "Occupation", "Zip-code")
    rows = []
    for number, parts in _split_fields(path, "::", fields, "latin-1"):
        rows.append((_as_int(parts[0], path, number, "UserID"), parts[1],
                     _as_int(parts[2], path, number, "Age"), _as_int(parts[3], path, number, "Occupation"), parts[4]))
    users = pd.DataFrame(rows, columns=[USER, "gender", "age", "occupation", "zip_code"])
    _require_unique(users[USER], path, "UserID")
    return users


def read_movielens_100k_ratings(path: Path) -> pd.DataFrame:
    """ML-100K `u.data`: user id TAB item id TAB rating TAB timestamp."""
    fields = ("user id", "item id", RATING, TIME)
    df = _read_table(path, "\t", fields, header=None, encoding="latin-1")
    return _event_frame(
        _integer_column(df["user id"], path, "user id", 1),
        _integer_column(df["item id"], path, "item id", 1),
        _ratings(_number_column(df["rating"], path, "rating", 1), path, 1, 5, 1, 1),
        _timestamps(_integer_column(df[TIME], path, TIME, 1), path, 1),
    )


def read_movielens_100k_items(path: Path) -> pd.DataFrame:
    """ML-100K `u.item` (latin-1, '|'): movie id | title | release date | video date | IMDb URL | 19 genre flags."""
    rows = []
    for number, line in _lines(path, "latin-1"):
        parts = line.split("|")
        if len(parts) != 24:
            raise DatasetFormatError(
                f"{path}, line {number}: expected 24 '|'-separated fields (movie id, title, release date, video "
                f"release date, IMDb URL, 19 genre flags), found {len(parts)}: {line[:120]!r}{_separator_hint(line)}"
            )
        rows.append((_as_int(parts[0], path, number, "movie id"), parts[1], parts[2]))
    return _catalogue_frame(rows, ("title", "release_date"), path)


def read_movielens_csv_ratings(path: Path) -> pd.DataFrame:
    """ML-20M / ML-25M / ml-latest `ratings.csv`: header userId,movieId,rating,timestamp; 0.5..5 half stars."""
    fields = ("userId", "movieId", RATING, TIME)  # the file's header
    df = _read_table(path, ",", fields, header=fields, encoding="utf-8")
    return _event_frame(
        _integer_column(df["userId"], path, "userId", 2),
        _integer_column(df["movieId"], path, "movieId", 2),
        _ratings(_number_column(df["rating"], path, "rating", 2), path, 0.5, 5, 0.5, 2),
        _timestamps(_integer_column(df[TIME], path, TIME, 2), path, 2),
    )


def read_movielens_csv_movies(path: Path) -> pd.DataFrame:
    """`movies.csv`: header movieId,title,genres (titles are quoted when they hold commas)."""
    first = _first_line(path, "utf-8")
    if first.strip() != "movieId,title,genres":
        raise DatasetFormatError(f"{path}, line 1: expected the header 'movieId,title,genres', found {first[:120]!r}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.ParserError as error:
        raise DatasetFormatError(f"{path}: {error}".strip() + " (expected 3 fields: movieId,title,genres)") from None
    ids = _integer_column(df["movieId"].replace("", np.nan), path, "movieId", 2)
    rows = list(zip(ids.tolist(), df["title"], df["genres"]))
    return _catalogue_frame(rows, ("title", "genres"), path)


def read_amazon_ratings(path: Path) -> pd.DataFrame:
    """Amazon 2014 ratings-only csv (e.g. ratings_Books.csv), NO header: user,item,rating,timestamp.

    User and item ids are strings (item = ASIN; ISBN-like ASINs have leading zeros, so they are never parsed as
    numbers); ratings 1..5; timestamps unix seconds.
    """
    fields = ("user", "item", RATING, TIME)
    df = _read_table(path, ",", fields, header=None, encoding="utf-8", dtype={0: str, 1: str})
    times = df[TIME]
    if not pd.api.types.is_integer_dtype(times.dtype):
        whole = times.astype(str).str.fullmatch(r"\d+").to_numpy()
        if not whole.all():
            row = int(np.argmax(~whole))
            raise DatasetFormatError(
                f"{path}, line {row + 1}: timestamp must be whole unix seconds, got {times.iloc[row]!r}"
                + (" (the file must have no header line)" if row == 0 else "")
            )
    return _event_frame(
        df["user"].to_numpy(dtype=object),
        df["item"].to_numpy(dtype=object),
        _ratings(_number_column(df["rating"], path, "rating", 1), path, 1, 5, 1, 1),
        _timestamps(times.to_numpy().astype(np.int64), path, 1),
    )


def read_s3rec_sequences(path: Path) -> pd.DataFrame:
    """S3-Rec sequence file: one line per user, `user_id item_1 item_2 ...` (space-separated, chronological).

    Returns one event row per item in list order (user_id, item_id); there are no ratings or timestamps.
    Strict (the published files): integer ids, a user id and at least one item on every line.
    """
    frame, _, _ = _parse_sequences(Path(path), user_ids=True, strict=True)
    return frame


def read_sequence_file(path: PathLike, user_ids: Optional[bool] = None, columns: Tuple[str, str] = (USER, ITEM),
                       user_ids_flag: str = "--sequence-user-ids") -> Tuple[pd.DataFrame, np.ndarray, str]:
    """A user's sequence-per-line text file: `user item item ...` or `item item ...` (whitespace-separated).

    `user_ids`: True, the first token of a line is its user id; False, the line number (1-based) is the id;
    None, detect it: user ids when every line has two or more tokens and the first tokens are all distinct (the
    S3-Rec convention), else line numbers. Ids are int64 when every token is an integer that fits int64, else
    strings. Returns (events in list order with `columns` = (id, item), the file line of every event, a note
    saying how the file was read).
    """
    return _parse_sequences(Path(path), user_ids=user_ids, strict=False, columns=columns, flag=user_ids_flag)


def _parse_sequences(path: Path, user_ids: Optional[bool], strict: bool, columns: Tuple[str, str] = (USER, ITEM),
                     flag: str = "--sequence-user-ids") -> Tuple[pd.DataFrame, np.ndarray, str]:
    rows = [(number, line.split()) for number, line in _lines(path, "utf-8")]
    if not rows:
        raise DatasetFormatError(f"{path}: the file holds no sequences (it is empty). Fix: pass a file with one "
                                 "sequence per line, `user item item ...`.")
    how = "the first token of each line is its user id" if user_ids else "the line number is the user id"
    if user_ids is None:
        firsts = [tokens[0] for _, tokens in rows]
        user_ids = all(len(tokens) >= 2 for _, tokens in rows) and len(set(firsts)) == len(firsts)
        how = (f"the first token of each line is read as its user id (every line has 2+ tokens and the first ones "
               f"are distinct); pass {flag} no if it is an item" if user_ids else
               f"the line number is the user id (the first tokens repeat or a line has one token); pass {flag} yes "
               "if the first token is a user id")
    users: List = []
    items: List = []
    lines: List[int] = []
    seen: Dict = {}
    for number, tokens in rows:
        if user_ids and len(tokens) < 2:
            raise DatasetFormatError(
                f"{path}, line {number}: expected 'user_id item_id [item_id ...]' (space-separated), found "
                f"{' '.join(tokens)[:120]!r}{_separator_hint(' '.join(tokens))}"
                + ("" if strict else f". Fix: {flag} no if the lines hold items only")
            )
        if strict:
            bad = next((t for t in tokens if not t.lstrip("-").isdigit()), None)
            if bad is not None:
                raise DatasetFormatError(f"{path}, line {number}: ids must be integers separated by spaces, got "
                                         f"{bad!r}{_separator_hint(' '.join(tokens))}")
        user = tokens[0] if user_ids else str(number)
        if user_ids:
            if user in seen:
                raise DatasetFormatError(
                    f"{path}, line {number}: user {user} already had a line (line {seen[user]}); one line per user"
                    + ("" if strict else f". Fix: merge the two lines, or {flag} no if the first token is an item")
                )
            seen[user] = number
        body = tokens[1:] if user_ids else tokens
        users.extend([user] * len(body))
        items.extend(body)
        lines.extend([number] * len(body))
    frame = pd.DataFrame({columns[0]: _sequence_ids(users), columns[1]: _sequence_ids(items)})
    note = f"{path}: sequence-per-line file, {len(rows):,} lines; {how}"
    return frame, np.asarray(lines, dtype=np.int64), note


def _sequence_ids(tokens: List[str]) -> np.ndarray:
    """int64 when every token is an integer that fits int64, else the tokens as strings."""
    try:
        values = np.asarray([int(t) for t in tokens], dtype=object)
    except ValueError:
        return np.asarray(tokens, dtype=object)
    if len(values) and (max(values) > np.iinfo(np.int64).max or min(values) < np.iinfo(np.int64).min):
        return np.asarray(tokens, dtype=object)
    return values.astype(np.int64)


def _catalogue_frame(rows, extra: Sequence[str], path: Path) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=[ITEM, *extra])
    if frame.empty:
        raise DatasetFormatError(f"{path}: the catalogue file lists no items")
    _require_unique(frame[ITEM], path, "item id")
    return frame


def _require_unique(ids: pd.Series, path: Path, name: str) -> None:
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise DatasetFormatError(f"{path}: {name} {duplicated.iloc[0]!r} is listed more than once")


# ---------------------------------------------------------------------------------------------------------
# checks and filters
# ---------------------------------------------------------------------------------------------------------
def check_ids_positive(events: pd.DataFrame, path: Path) -> None:
    """Raw ids are kept, and 0 is the padding id: every item id must be >= 1."""
    low = int(events[ITEM].min())
    if low < 1:
        raise DatasetFormatError(f"{path}: item id {low} found; raw item ids must be >= 1 (0 is padding)")


def check_in_catalogue(events: pd.DataFrame, catalogue: pd.DataFrame, ratings_path: Path, catalogue_path: Path) -> None:
    """Every rated item must be in the catalogue (else it could never be a candidate)."""
    missing = np.setdiff1d(events[ITEM].unique(), catalogue[ITEM].to_numpy())
    if len(missing):
        raise DatasetFormatError(
            f"{ratings_path}: {len(missing)} item id(s) are not in {catalogue_path.name} (e.g. {missing[:5].tolist()}); "
            "the two files do not belong together."
        )


def check_expected_counts(loaded: LoadedDataset, expected: ExpectedCounts) -> None:
    """Compare with the published sizes; a mismatch means a different or modified file."""
    events = loaded.events
    found = {
        "events": len(events),
        "users": int(events[USER].nunique()),
        "items": int(events[ITEM].nunique()),
        "candidates": None if loaded.candidates is None else len(loaded.candidates),
        "max_item_id": None if loaded.candidates is None else int(np.max(loaded.candidates)),
    }
    wrong = [
        f"{key}: expected {want:,}, found {found[key]:,}" if found[key] is not None else f"{key}: expected {want:,}"
        for key, want in vars(expected).items()
        if want is not None and found[key] != want
    ]
    if wrong:
        raise DatasetFormatError(
            f"{loaded.name}: {', '.join(str(f) for f in loaded.files)} do not have the published sizes ("
            + "; ".join(wrong)
            + "). This is a different or modified copy. Fix: use the official files, or pass check_counts=False "
            "to load it anyway."
        )


def filter_min_counts(events: pd.DataFrame, min_item: int = 5, min_user: int = 5) -> Tuple[pd.DataFrame, Dict[str, int]]:
    """The reference's Amazon filter: one pass, both counts taken on the unfiltered log.

        keep row (u, i)  iff  #ratings(i) >= min_item  and  #ratings(u) >= min_user

    Counts are not recomputed after dropping rows, so a kept user may end with fewer than `min_user`
    ratings; the sequence-length filter (workflow min_length) runs afterwards.
    """
    item_count = events[ITEM].map(events[ITEM].value_counts())
    user_count = events[USER].map(events[USER].value_counts())
    kept = events[(item_count >= min_item).to_numpy() & (user_count >= min_user).to_numpy()].reset_index(drop=True)
    counts = {
        "events_in": len(events), "users_in": int(events[USER].nunique()), "items_in": int(events[ITEM].nunique()),
        "events_kept": len(kept), "users_kept": int(kept[USER].nunique()), "items_kept": int(kept[ITEM].nunique()),
    }
    return kept, counts


# ---------------------------------------------------------------------------------------------------------
# dataset loaders
# ---------------------------------------------------------------------------------------------------------
def _movielens_dat(name: str, ratings_file: str) -> Loader:
    def load(input_path: Path) -> LoadedDataset:
        if input_path.is_file():
            raise DatasetFormatError(f"{name}: --input must be the directory holding {ratings_file}, movies.dat, users.dat")
        ratings_path = locate(input_path, ratings_file, name)
        movies_path = locate(input_path, "movies.dat", name)
        users_path = locate(input_path, "users.dat", name)
        events = read_movielens_dat_ratings(ratings_path)
        movies = read_movielens_dat_movies(movies_path)
        users = read_movielens_dat_users(users_path)
        check_ids_positive(events, ratings_path)
        check_in_catalogue(events, movies, ratings_path, movies_path)
        unknown = np.setdiff1d(events[USER].unique(), users[USER].to_numpy())
        if len(unknown):
            raise DatasetFormatError(
                f"{ratings_path}: {len(unknown)} user id(s) are not in {users_path.name} (e.g. {unknown[:5].tolist()})"
            )
        return LoadedDataset(
            name=name, events=events, candidates=np.sort(movies[ITEM].to_numpy(dtype=np.int64)),
            item_encoding="raw", min_length=1, files=(ratings_path, movies_path, users_path),
            user_features=users, item_features=movies,
        )

    return load


def _movielens_csv(name: str) -> Loader:
    def load(input_path: Path) -> LoadedDataset:
        if input_path.is_file():
            raise DatasetFormatError(f"{name}: --input must be the directory holding ratings.csv and movies.csv")
        ratings_path = locate(input_path, "ratings.csv", name)
        movies_path = locate(input_path, "movies.csv", name)
        events = read_movielens_csv_ratings(ratings_path)
        movies = read_movielens_csv_movies(movies_path)
        check_ids_positive(events, ratings_path)
        check_in_catalogue(events, movies, ratings_path, movies_path)
        return LoadedDataset(
            name=name, events=events, candidates=np.sort(movies[ITEM].to_numpy(dtype=np.int64)),
            item_encoding="raw", min_length=1, files=(ratings_path, movies_path), item_features=movies,
        )

    return load


def _load_ml_100k(input_path: Path) -> LoadedDataset:
    if input_path.is_file():
        raise DatasetFormatError("ml-100k: --input must be the directory holding u.data and u.item")
    ratings_path = locate(input_path, "u.data", "ml-100k")
    items_path = locate(input_path, "u.item", "ml-100k")
    events = read_movielens_100k_ratings(ratings_path)
    items = read_movielens_100k_items(items_path)
    check_ids_positive(events, ratings_path)
    check_in_catalogue(events, items, ratings_path, items_path)
    return LoadedDataset(
        name="ml-100k", events=events, candidates=np.sort(items[ITEM].to_numpy(dtype=np.int64)),
        item_encoding="raw", min_length=1, files=(ratings_path, items_path), item_features=items,
    )


def _load_amzn_books(input_path: Path) -> LoadedDataset:
    path = locate(input_path, "ratings_Books.csv", "amzn-books")
    kept, counts = filter_min_counts(read_amazon_ratings(path), min_item=5, min_user=5)
    if kept.empty:
        raise DatasetFormatError(f"{path}: no rating has an item and a user with >= 5 ratings each")
    return LoadedDataset(
        name="amzn-books", events=kept, candidates=None, item_encoding="categorify", min_length=5,
        files=(path,), filter_counts=counts,
    )


#: S3-Rec files staged from salesforce/ICLRec, with the sizes of the S3-Rec paper's table (users, items, events)
S3REC_FILES: Dict[str, Tuple[str, ExpectedCounts]] = {
    "beauty": ("Beauty.txt", ExpectedCounts(events=198_502, users=22_363, items=12_101, candidates=12_101,
                                            max_item_id=12_101)),
    "sports": ("Sports_and_Outdoors.txt", ExpectedCounts(events=296_337, users=35_598, items=18_357,
                                                         candidates=18_357, max_item_id=18_357)),
    "toys": ("Toys_and_Games.txt", ExpectedCounts(events=167_597, users=19_412, items=11_924, candidates=11_924,
                                                  max_item_id=11_924)),
}


def _s3rec_loader(category: Optional[str]) -> Loader:
    name = "amazon-s3rec" + (f"-{category}" if category else "")

    def load(input_path: Path) -> LoadedDataset:
        if category is not None:
            path = locate(input_path, S3REC_FILES[category][0], name)
        elif input_path.is_dir():
            found = sorted(p for p in input_path.iterdir()
                           if p.is_file() and any(p.name.endswith(f".txt{s}") for s in COMPRESSIONS))
            if len(found) != 1:
                raise DatasetFormatError(
                    f"{name}: --input {str(input_path)!r} must be one S3-Rec .txt file or a directory holding exactly "
                    f"one (found {[p.name for p in found]}). Fix: pass the file, or use "
                    + ", ".join(f"amazon-s3rec-{c}" for c in S3REC_FILES) + "."
                )
            path = found[0]
        else:
            path = locate(input_path, input_path.name, name)
        events = read_s3rec_sequences(path)
        check_ids_positive(events, path)
        # a known file (by name) is checked against its published sizes
        stem = path.name.split(".txt")[0] + ".txt"
        expected = next((counts for file, counts in S3REC_FILES.values() if file == stem), None)
        return LoadedDataset(
            name=name, events=events, candidates=np.sort(events[ITEM].unique()), item_encoding="raw",
            min_length=1, files=(path,), expected=expected,
        )

    return load


def _spec(name, description, files, source, loader, expected=None, staged=None) -> DatasetSpec:
    return DatasetSpec(name=name, description=description, files=tuple(files), source=source, loader=loader,
                       expected=expected, staged=staged)


_GROUPLENS = "https://grouplens.org/datasets/movielens/"
_AMAZON_2014 = "http://jmcauley.ucsd.edu/data/amazon/ (ratings-only files: snap.stanford.edu/data/amazon/productGraph/categoryFiles/)"
_S3REC = "S3-Rec preprocessing (Zhou et al., CIKM 2020); copies in github.com/salesforce/ICLRec data/"

DATASETS: Dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        _spec("ml-1m", "MovieLens 1M: 1,000,209 ratings, 6,040 users, 3,706 rated of 3,883 movies; raw ids",
              ("ratings.dat", "movies.dat", "users.dat"), _GROUPLENS + "1m/ (ml-1m.zip)",
              _movielens_dat("ml-1m", "ratings.dat"),
              ExpectedCounts(events=1_000_209, users=6_040, items=3_706, candidates=3_883, max_item_id=3_952)),
        _spec("ml-1m-prefix", "the first 487,650 lines of ML-1M ratings.dat (users 1-2,999) with the full "
              "movies.dat; a real-data subset, not comparable with published ML-1M numbers",
              ("ratings.prefix-487650.dat", "movies.dat", "users.dat"), "shared/data/movielens-1m (see its README)",
              _movielens_dat("ml-1m-prefix", "ratings.prefix-487650.dat"),
              ExpectedCounts(events=487_650, users=2_999, items=3_615, candidates=3_883, max_item_id=3_952),
              staged="movielens-1m"),
        _spec("ml-20m", "MovieLens 20M: ratings.csv + movies.csv; raw ids",
              ("ratings.csv", "movies.csv"), _GROUPLENS + "20m/ (ml-20m.zip)", _movielens_csv("ml-20m"),
              ExpectedCounts(events=20_000_263, users=138_493, items=26_744, candidates=27_278, max_item_id=131_262)),
        _spec("ml-latest-small", "MovieLens latest-small (2018; development only): the ML-20M csv format",
              ("ratings.csv", "movies.csv"), _GROUPLENS + "latest/ (ml-latest-small.zip)",
              _movielens_csv("ml-latest-small"),
              ExpectedCounts(events=100_836, users=610, items=9_724, candidates=9_742, max_item_id=193_609),
              staged="movielens-latest-small"),
        _spec("ml-100k", "MovieLens 100K: u.data + u.item; raw ids",
              ("u.data", "u.item"), _GROUPLENS + "100k/ (ml-100k.zip)", _load_ml_100k,
              ExpectedCounts(events=100_000, users=943, items=1_682, candidates=1_682, max_item_id=1_682),
              staged="movielens-100k"),
        _spec("amzn-books", "Amazon 2014 Books ratings-only csv; 5/5 count filter, sequences >= 5; categorified",
              ("ratings_Books.csv",), _AMAZON_2014, _load_amzn_books,
              ExpectedCounts(items=695_762)),
        _spec("amazon-s3rec", "an Amazon 2014 S3-Rec sequence file (user item item ...; no timestamps); "
              "--input is the .txt file", ("<Category>.txt",), _S3REC, _s3rec_loader(None)),
        *[
            _spec(f"amazon-s3rec-{category}", f"Amazon 2014 {file[:-4]} in S3-Rec form (5-core, ids 1..N, "
                  "chronological lists, no timestamps)", (file,), _S3REC, _s3rec_loader(category), counts,
                  staged="amazon2014-s3rec")
            for category, (file, counts) in S3REC_FILES.items()
        ],
    ]
}


def dataset_names() -> List[str]:
    """The registered dataset names (for `merlin-hstu preprocess --dataset NAME`)."""
    return list(DATASETS)


#: the staged public datasets (see its README); MERLIN_HSTU_SHARED_DATA points elsewhere
SHARED_DATA = Path(os.environ.get("MERLIN_HSTU_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def default_input_dir(name: str) -> Optional[Path]:
    """The staged copy of dataset `name` under shared/data, or None when it is not staged (or absent here)."""
    staged = get_spec(name).staged
    if staged is None:
        return None
    folder = SHARED_DATA / staged
    return folder if folder.is_dir() else None


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, input_path: PathLike, *, check_counts: bool = True) -> LoadedDataset:
    """Read dataset `name` from `input_path` (its directory, or the file for single-file datasets)."""
    return get_spec(name).load(input_path, check_counts=check_counts)


def preprocess_dataset(
    name: str,
    input_dir: PathLike,
    output_dir: PathLike,
    max_length: int = DEFAULT_MAX_LENGTH,
    overwrite: bool = False,
    *,
    check_counts: bool = True,
    max_history_chosen_by: Optional[str] = None,
) -> ProcessedDataset:
    """Load dataset `name` and run the session workflow with its id policy, candidate pool and filters.

    Output as `session_workflow.preprocess`: output_dir/{processed/, workflow/, candidates.parquet,
    data_report.json}.
    """
    loaded = load_dataset(name, input_dir, check_counts=check_counts)
    return preprocess_loaded(loaded, output_dir, max_length, overwrite=overwrite,
                             max_history_chosen_by=max_history_chosen_by)


def preprocess_loaded(loaded: LoadedDataset, output_dir: PathLike, max_length: int = DEFAULT_MAX_LENGTH,
                      overwrite: bool = False, *, max_history_chosen_by: Optional[str] = None) -> ProcessedDataset:
    """`preprocess_dataset` for a dataset already loaded (e.g. to size max_length from its lengths first)."""
    from merlin_hstu.workflows.session_workflow import load_event_log

    config = loaded.workflow_config(max_length)
    events = loaded.events.copy(deep=False)
    source = ", ".join(str(f) for f in loaded.files)
    events.attrs = {ORIGIN_ATTR: LogOrigin(source, "dataframe")}
    extra = {"dataset": loaded.name}
    if loaded.filter_counts:
        c = loaded.filter_counts
        extra["dropped"] = {"count_filter": {
            "events": c["events_in"] - c["events_kept"], "users": c["users_in"] - c["users_kept"],
            "items": c["items_in"] - c["items_kept"], "how": "the dataset's 5-core filter (datasets.md)"}}
        extra["in"] = {"sequences": c["users_in"], "events": c["events_in"]}  # as read, before that filter
    return preprocess(load_event_log(events, config), output_dir, config, overwrite=overwrite,
                      candidates=loaded.candidates, max_history_chosen_by=max_history_chosen_by, report_extra=extra)


def read_events(dataset, path):
    """The events of a named dataset (`--dataset`, its staged raw files) or of an event log (`--input`: Parquet or
    CSV) as a DataFrame, for `merlin-hstu expand` and `bench scale`."""
    import pandas as pd

    if dataset:
        if dataset not in DATASETS:
            raise ValueError(f"--dataset {dataset}: unknown; use one of {', '.join(DATASETS)}")
        folder = default_input_dir(dataset)
        if folder is None:
            raise ValueError(f"--dataset {dataset} is not staged on this machine; pass its event log with --input")
        return get_spec(dataset).load(folder).events
    if path.endswith(".parquet") or not path.endswith((".csv", ".csv.gz", ".csv.xz")):
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - reported with the file name
            if path.endswith(".parquet"):
                raise ValueError(f"--input {path}: not a readable Parquet file ({exc})") from exc
    return pd.read_csv(path)


def cached_dataset(name: str, cache_root: PathLike, max_history: int, input_dir: Optional[PathLike] = None,
                   log=print) -> Path:
    """The named dataset preprocessed by its session workflow once, at `cache_root/<name>-h<max_history>` (what
    `merlin-hstu bench`, `bench sid` and `bench hllm` share). One process builds it while others using the same
    cache wait (`common.atomic_dir.exclusive`); the output is published atomically."""
    from merlin_hstu.common.atomic_dir import exclusive

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use one of {sorted(DATASETS)} or the output directory of "
                         "`merlin-hstu preprocess`")
    out = Path(cache_root) / f"{name}-h{max_history}"
    with exclusive(out):
        if not (out / "processed").is_dir():
            source = input_dir or default_input_dir(name)
            if source is None:
                raise ValueError(f"dataset {name!r} is not staged here: pass --input DIR with its files")
            log(f"preprocessing {name} from {source} -> {out}")
            preprocess_dataset(name, source, out, max_length=max_history + 2)
    return out
