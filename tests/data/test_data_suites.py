"""The versioned GX suites (tuneops/data/suites/*.json): valid GX 1.x ExpectationSuite
JSON, versioned, every expectation mapped to a field/rule/message, every column and
suite parameter supplied by the gate."""
from __future__ import annotations

import json
import re

import pytest

from tuneops.data import FORMATS
from tuneops.data.gate import SUITES_DIR, Settings, _base_features, _derive, _parameters, load_suite
from tuneops.data.records import Row

from tests.data.test_data_formats import CASES


def test_one_suite_per_format_plus_leakage():
    assert sorted(p.stem for p in SUITES_DIR.glob("*.json")) == sorted((*FORMATS, "leakage"))


@pytest.mark.parametrize("name", [*FORMATS, "leakage"])
def test_suite_is_versioned_gx_json_with_known_columns_and_parameters(name):
    import great_expectations as gx

    from tuneops.data import formats

    suite = load_suite(name)
    meta = suite["meta"]["tuneops"]
    assert isinstance(meta["version"], int) and meta["version"] >= 1 and meta["description"]
    gx.get_context(mode="ephemeral")
    parsed = gx.ExpectationSuite(name=suite["name"], expectations=suite["expectations"])
    assert len(parsed.expectations) == len(suite["expectations"])
    fmt = name if name != "leakage" else "text"
    rows = [Row(i + 1, obj) for i, obj in enumerate(CASES[fmt][0])]
    df = _derive(_base_features(rows, formats.get(fmt), [5] * len(rows)), _base_features(rows, formats.get(fmt),
                                                                                              [5] * len(rows)))
    params = _parameters(Settings(format=fmt), "eval", ["a"], "train.jsonl")
    for exp in suite["expectations"]:
        m = exp["meta"]
        assert m["field"] and re.fullmatch(r"[a-z_]+", m["rule"]) and m["message"]
        if "column" in exp["kwargs"]:
            assert exp["kwargs"]["column"] in df.columns, (name, exp["kwargs"]["column"])
        for ref in re.findall(r'"\$PARAMETER": "(\w+)"', json.dumps(exp)):
            assert ref in params, (name, ref)
