"""The CTR request contract (WuKong, DLRM, logistic regression over the Criteo workflow): rows of raw Criteo-style
columns in, one click probability per row out.  Pure numpy (pandas inside the client-side builder), like `contract`.

    <integer column>    [B] FP64    one per integer feature of the workflow (I1..I13); NaN = missing
    <categorical>       [B] BYTES   one per categorical feature (C1..C26); "" = missing (Categorify's null id 1,
                                    as an empty field in a Criteo file)
    -> click_probability [B] FP32   sigmoid of the model's logit, rows in request order

A client builds the request from a DataFrame (`CTRRequest`, e.g. `read_criteo_tsv` output); columns the model does
not take (the label) are ignored there.  The same raw line gives the same features offline and served.

Runs trained on ml-1m-prefix-ctr (`encoding="ml-1m-ctr"`) take the raw feature columns of
`merlin_hstu.ctr.data.ml1m_ctr_frame` the same way: numbers (user_id, item_id, age, occupation, hour, weekday,
release_year) as FP64, text (gender, zip_prefix, genre_1, genre_2) as BYTES; NaN / "" = missing (id 0, count 0,
the train mean), encoded in the server by the run's saved `ML1MCTREncoder`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Sequence

import numpy as np

from merlin_hstu.serving.contract import BadRequest, ServingContract, TensorSpec

OUTPUT = "click_probability"


@dataclass
class CTRRequest:
    """Rows of raw Criteo-style columns: a DataFrame with the contract's integer and categorical columns (others,
    such as the label, are ignored); NaN / None / "" = missing."""

    rows: Any  # pandas.DataFrame


@dataclass
class ValidCTRRequest:
    arrays: Dict[str, np.ndarray]  # integer columns float64, categorical columns object (bytes / str)
    batch_size: int


@dataclass
class CTRContract(ServingContract):
    """CTR: the encoder's raw numeric and text columns, in the model's order (`encoding`: what encodes them)."""

    task: ClassVar[str] = "ctr"

    integer_columns: List[str]
    categorical_columns: List[str]
    output: str = OUTPUT
    model_name: str = "ctr"
    encoding: str = "criteo-workflow"  # criteo-workflow (the fitted NVTabular Criteo workflow) | ml-1m-ctr

    def inputs(self, batched: bool = False) -> List[TensorSpec]:
        if batched:
            raise ValueError("the CTR export has no batched endpoint")
        return ([TensorSpec(c, "TYPE_FP64") for c in self.integer_columns]
                + [TensorSpec(c, "TYPE_STRING") for c in self.categorical_columns])

    def outputs(self) -> List[TensorSpec]:
        return [TensorSpec(self.output, "TYPE_FP32")]

    # --- client side ------------------------------------------------------------------------------
    def request_arrays(self, request) -> Dict[str, np.ndarray]:
        """CTRRequest (or a DataFrame) -> wire arrays: integers as FP64 (NaN = missing), text as utf-8 BYTES."""
        import pandas as pd

        frame = request.rows if isinstance(request, CTRRequest) else request
        missing = [c for c in self.integer_columns + self.categorical_columns if c not in frame.columns]
        if missing:
            if self.encoding == "ml-1m-ctr":
                raise BadRequest(f"CTR request lacks column(s) {missing}; send {self.integer_columns} and "
                                 f"{self.categorical_columns} (ml1m_ctr_frame columns; empty / NaN = missing)")
            raise BadRequest(f"CTR request lacks column(s) {missing}; send {self.integer_columns[0]}.."
                             f"{self.integer_columns[-1]} and {self.categorical_columns[0]}.."
                             f"{self.categorical_columns[-1]} (read_criteo_tsv output; empty / NaN = missing)")
        arrays = {}
        for name in self.integer_columns:
            try:
                arrays[name] = pd.to_numeric(frame[name], errors="raise").to_numpy(dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise BadRequest(f"column {name!r} must hold numbers (empty / NaN = missing): {exc}") from None
        for name in self.categorical_columns:
            arrays[name] = np.array([b"" if pd.isna(v) else v if isinstance(v, bytes) else str(v).encode("utf-8")
                                     for v in frame[name]], dtype=object)
        return arrays

    def result(self, outputs: Mapping[str, np.ndarray], valid: ValidCTRRequest) -> np.ndarray:
        return np.asarray(outputs[self.output]).reshape(-1)

    # --- validation -------------------------------------------------------------------------------
    def validate(self, arrays: Mapping[str, np.ndarray], batched: bool = False) -> ValidCTRRequest:
        if batched:
            raise BadRequest("the CTR export has no batched endpoint; send B rows in one plain request")
        a = self.check_tensors(arrays, self.inputs())
        first = self.integer_columns[0] if self.integer_columns else self.categorical_columns[0]
        batch = len(a[first])
        if batch == 0:
            raise BadRequest(f"{first!r} is empty: a request needs at least one row")
        uneven = [c for c in a if len(a[c]) != batch]
        if uneven:
            raise BadRequest(f"column {uneven[0]!r} has {len(a[uneven[0]])} value(s) but {first!r} has {batch}; every "
                             "column needs one value per row (NaN / \"\" = missing)")
        out = {c: a[c].astype(np.float64) for c in self.integer_columns}
        out.update({c: a[c] for c in self.categorical_columns})
        return ValidCTRRequest(out, batch)

    # --- the serving graph's side -----------------------------------------------------------------
    def table(self, requests: Sequence[ValidCTRRequest]):
        """The rows of every request as one DataFrame (what the Criteo workflow op reads)."""
        import pandas as pd

        return pd.DataFrame({c: np.concatenate([r.arrays[c] for r in requests])
                             for c in self.integer_columns + self.categorical_columns})

    def split(self, out, requests: Sequence[ValidCTRRequest]) -> List[tuple]:
        probabilities = np.asarray(out[self.output].to_numpy() if hasattr(out[self.output], "to_numpy")
                                   else out[self.output].values, dtype=np.float32).reshape(-1)
        results, start = [], 0
        for r in requests:
            results.append((probabilities[start:start + r.batch_size],))
            start += r.batch_size
        return results
