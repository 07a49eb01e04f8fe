import numpy as np
import pandas as pd
import pytest

from conftest import ETTH1, make_frame
from timecma.core.errors import InputError
from timecma.core.scaling import Scaler
from timecma.data import DataError, load_series, make_windows, split_borders


def test_ett_split_counts_on_etth1():
    s = load_series(ETTH1)
    assert s.frequency == "hourly" and s.variables == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    b = split_borders(len(s.values), 96, "ett", s.frequency)
    assert b == {"train": (0, 8640), "val": (8544, 11520), "test": (11424, 14400)}
    w = make_windows(b, 96, 96)
    assert [len(w[k].starts) for k in ("train", "val", "test")] == [8449, 2785, 2785]
    assert len(make_windows(b, 96, 96, train_stride=4)["train"].starts) == 2113


def test_ratio_split_and_scaler_on_train_rows():
    values = np.arange(1000, dtype=float)[:, None]
    b = split_borders(1000, 24, "ratio", "hourly")
    assert b == {"train": (0, 700), "val": (676, 800), "test": (776, 1000)}
    sc = Scaler.fit(values[:700], ["a"])
    assert sc.mean[0] == pytest.approx(349.5)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda df: df.drop(columns=["date"]), "no timestamp column 'date'"),
        (lambda df: df.assign(v1=["x"] * len(df)), "non-numeric column\\(s\\) \\['v1'\\]"),
        (lambda df: df.assign(v2=np.where(np.arange(len(df)) == 7, np.nan, df.v2)), "non-finite value nan in column 'v2' at row 7"),
        (lambda df: df.assign(v0=np.where(np.arange(len(df)) == 9, np.inf, df.v0)), "non-finite value inf in column 'v0' at row 9"),
        (lambda df: df.iloc[[0, 2, 1] + list(range(3, len(df)))], "not sorted: row 2"),
        (lambda df: pd.concat([df.iloc[:5], df.iloc[4:]]), "duplicate timestamp .* at row 5"),
    ],
)
def test_bad_input_is_named(tmp_path, mutate, message):
    path = tmp_path / "bad.csv"
    mutate(make_frame()).to_csv(path, index=False)
    with pytest.raises(DataError, match=message):
        load_series(path)


def test_missing_file_constant_column_and_too_few_rows(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_series(tmp_path / "nope.csv")
    s = load_series(_write(tmp_path, make_frame().assign(v1=3.0)))
    with pytest.raises(InputError, match="constant column\\(s\\) \\['v1'\\]"):
        Scaler.fit(s.values, s.variables)
    with pytest.raises(DataError, match="the val split has .* fewer than one window"):
        make_windows(split_borders(100, 24, "ratio", "hourly"), 24, 12)
    with pytest.raises(DataError, match="'ett' split needs 14400 rows"):
        split_borders(500, 24, "ett", "hourly")


def test_parquet_and_frequency(tmp_path):
    path = tmp_path / "x.parquet"
    make_frame(freq="15min").to_parquet(path)
    assert load_series(path).frequency == "15min"


def _write(tmp_path, df):
    p = tmp_path / "d.csv"
    df.to_csv(p, index=False)
    return p
