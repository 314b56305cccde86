"""CSR outliers (refq/formats/outliers.py): round trip, cost, validation."""
import numpy as np
import pytest

from refq.errors import RefqError
from refq.formats.outliers import CSR


def test_round_trip_and_order():
    rng = np.random.default_rng(0)
    S = np.zeros((5, 9))
    S[0, 3], S[0, 1], S[3, 8], S[4, 0] = 1.5, -2.0, 7.25, 0.125
    csr = CSR.from_dense(S)
    assert csr.nnz == 4
    assert csr.rowptr.tolist() == [0, 2, 2, 2, 3, 4]
    assert csr.cols.tolist() == [1, 3, 8, 0]           # ascending within each row
    np.testing.assert_array_equal(csr.to_dense(), S)
    back = CSR.from_tensors(csr.tensors(), (5, 9))
    np.testing.assert_array_equal(back.to_dense(), S)
    # cost by hand: int32 rowptr (6) + uint16 cols (4) + fp16 values (4)
    assert sum(t.nbytes for t in csr.tensors().values()) == 6 * 4 + 4 * 2 + 4 * 2
    W = rng.normal(size=(5, 9))
    np.testing.assert_array_equal(CSR.from_mask(W, W > 1).to_dense(),
                                  np.where(W > 1, W.astype(np.float16), 0).astype(np.float32))


def test_empty_costs_nothing():
    csr = CSR.from_dense(np.zeros((3, 4)))
    assert csr.tensors() == {}
    assert CSR.from_tensors({}, (3, 4)).nnz == 0


def test_wide_layers_use_uint32_columns():
    S = np.zeros((1, 70000)); S[0, 69999] = 3.0
    csr = CSR.from_dense(S)
    assert csr.cols.dtype == np.uint32
    assert CSR.from_tensors(csr.tensors(), S.shape).to_dense()[0, 69999] == 3.0


@pytest.mark.parametrize("field, bad, match", [
    ("outlier_rowptr", np.array([0, 1, 0, 2], np.int32), "not decrease"),
    ("outlier_rowptr", np.array([0, 1, 2], np.int32), "int32 \\(4,\\)"),
    ("outlier_cols", np.array([1, 9], np.uint16), "column >= in_features"),
    ("outlier_cols", np.array([1, 2], np.int64), "uint16"),
    ("outlier_values", np.array([1, 2], np.float32), "float16"),
])
def test_bad_tensors_are_named(field, bad, match):
    S = np.zeros((3, 9)); S[0, 1] = 1; S[2, 2] = 2
    t = dict(CSR.from_dense(S).tensors())
    t[field] = bad
    with pytest.raises(RefqError, match=match):
        CSR.from_tensors(t, (3, 9), "layer x")


def test_missing_field_is_named():
    S = np.zeros((3, 9)); S[0, 1] = 1
    t = dict(CSR.from_dense(S).tensors())
    del t["outlier_cols"]
    with pytest.raises(RefqError, match="outlier_cols' is missing"):
        CSR.from_tensors(t, (3, 9))
