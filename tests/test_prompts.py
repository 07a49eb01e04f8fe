import csv

import numpy as np
import pytest

from conftest import ETTH1
from timecma.data import load_series
from timecma.core.prompts import PromptError, PromptRenderer, get_template

# Worked out by hand from rows 1..96 of ETTh1.csv, column HUFL: each value truncated
# toward zero, trend = 12.72599983215332 - 5.827000141143799 = 6.898999..., six decimals.
EXPECTED_FIRST_HUFL = (
    "From 01/07/2016 00:00 to 04/07/2016 23:00, the values were "
    "5, 5, 5, 5, 5, 5, 7, 7, 5, 4, 4, 5, 4, 4, 5, 5, 4, 4, 5, 5, 5, 5, 4, 4, 5, 5, 5, 5, 4, 5, 5, 5, 5, 5, "
    "9, 11, 9, 10, 8, 10, 9, 9, 10, 10, 9, 9, 9, 9, 10, 9, 10, 9, 10, 10, 12, 11, 10, 10, 11, 12, 9, 9, 10, "
    "9, 9, 11, 11, 10, 11, 10, 9, 9, 9, 8, 8, 9, 9, 9, 11, 11, 10, 11, 11, 12, 10, 10, 10, 10, 9, 11, 11, 9, "
    "10, 10, 9, 12 every hour. The total trend value was 6.899000"
)


def test_first_etth1_window_matches_reference_byte_for_byte():
    series = load_series(ETTH1)
    renderer = PromptRenderer(get_template("reference"), series.frequency)
    prompts = renderer.render_series(series.values, series.timestamps, [0], 96)
    assert series.variables[0] == "HUFL"
    assert prompts[0] == EXPECTED_FIRST_HUFL
    # and independently from the raw CSV text, with the csv module only
    with open(ETTH1) as f:
        rows = list(csv.reader(f))[1:97]
    vals = ", ".join(str(int(float(r[1]))) for r in rows)
    assert f"the values were {vals} every hour." in prompts[0]
    assert len(prompts) == 7 and prompts[6].startswith("From 01/07/2016 00:00 to 04/07/2016 23:00")


def test_truncation_toward_zero_and_minute_format():
    renderer = PromptRenderer(get_template("reference"), "15min")
    raw = np.array([[-1.7], [-0.5], [0.9], [2.2]])
    ts = np.array(["2021-03-05T10:15", "2021-03-05T10:30", "2021-03-05T10:45", "2021-03-05T11:00"], dtype="datetime64[ns]")
    (p,) = renderer.render_window(raw, ts)
    assert p == ("From 05/03/2021 10:15 to 05/03/2021 11:00, the values were -1, 0, 0, 2 every 15 minutes. "
                 "The total trend value was 3.900000")


def test_template_hash_is_stable_and_checked():
    ref = get_template("reference")
    assert ref.hash == get_template("reference", ref.hash).hash
    assert get_template("sig4").hash != ref.hash
    with pytest.raises(PromptError, match="hash"):
        get_template("reference", "0" * 64)
    with pytest.raises(PromptError, match="unknown prompt template"):
        get_template("nope")


def test_bad_values_are_refused():
    renderer = PromptRenderer(get_template("reference"), "hourly")
    ts = np.array(["2021-01-01T00", "2021-01-01T01"], dtype="datetime64[ns]")
    with pytest.raises(PromptError, match="NaN"):
        renderer.render_window(np.array([[1.0], [np.nan]]), ts)


def test_vectorised_values_and_trends_match_the_scalar_rules():
    """The renderer's fast paths write exactly what str(int(v)) and trend_value write."""
    import numpy as np

    from timecma.core.prompts import format_values, trend_value

    rng = np.random.default_rng(7)
    for scale in (1e-3, 1.0, 1e3, 1e6):
        raw = rng.normal(0, 1, (96, 4)) * scale
        raw[0, 0] = -0.5  # truncation toward zero gives "0", as int() does
        assert format_values(raw[:, 0], "int") == [str(int(v)) for v in raw[:, 0].tolist()]
        fast = np.diff(np.ascontiguousarray(raw.T), axis=1).sum(axis=1)
        assert fast.tolist() == [trend_value(raw[:, j]) for j in range(4)]
    huge = np.array([1e300, -3.7])
    assert format_values(huge, "int") == [str(int(1e300)), "-3"]


def test_reference_hash_is_pinned():
    """Adding template fields must not move the reference template's hash: bundles exported before keep loading."""
    assert get_template("reference").hash == "664e45169ce8d96d5a66f0349d1540a753429bc633756c8b9329b6b45f5567aa"


def test_log_values_template_writes_the_log_scaled_window():
    from timecma.core.scaling import Scaler

    series = load_series(ETTH1)
    z = Scaler.fit(series.values[:8640], series.variables, "log")
    record = {"name": "log-values", "hash": get_template("log-values").hash,
              "log_scaler": {"offset": z.offset.tolist(), "mean": z.mean.tolist(), "std": z.std.tolist()}}
    p = PromptRenderer.from_record(record, series.frequency).render_series(series.values, series.timestamps, [0], 96)
    hufl = np.clip((np.log(series.values[:96, 0] + z.offset[0]) - z.mean[0]) / z.std[0], -20, 20)
    assert p[0] == (f"From 01/07/2016 00:00 to 04/07/2016 23:00, the values were {', '.join(f'{v:.3f}' for v in hufl)}"
                    f" every hour. The total trend value was {np.diff(hufl).sum():.3f}")
    with pytest.raises(PromptError, match="log scaler"):
        PromptRenderer(get_template("log-values"), "hourly")
