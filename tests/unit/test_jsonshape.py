"""tcpwatch/jsonshape.py: bounded parsing and typed reading of a document from elsewhere."""

from __future__ import annotations

import pytest

from tcpwatch.jsonshape import MAX_JSON_VALUES, Shape, ShapeError, parse_bounded


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"[" + b"1," * MAX_JSON_VALUES + b"1]", "more than 1,000,000 JSON values"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
        (b"[" + b"9" * 5000 + b"]", "not JSON"),
        (b"\xff\xfe{", "not"),
        (b"{'a': 1}", "not JSON"),
    ],
)
def test_bodies_that_cost_too_much_or_are_not_json_are_one_line(body: bytes, message: str) -> None:
    with pytest.raises(ShapeError, match=message) as caught:
        parse_bounded(body)
    assert "\n" not in str(caught.value)


def test_fields_are_read_with_their_type_and_named_when_wrong() -> None:
    root = Shape(parse_bounded(b'{"items": [{"n": 1, "s": "x", "f": 0.5, "b": true}]}'))
    (item,) = root.field("items").items()
    assert item.field("n").integer() == 1 and item.field("s").string() == "x"
    assert item.field("f").number() == 0.5 and item.field("b").boolean() is True
    assert item.field("absent", required=False).optional_string() is None
    with pytest.raises(ShapeError, match=r"^items\[0\]\.absent: missing$"):
        item.field("absent")
    with pytest.raises(ShapeError, match=r"^items\[0\]\.s: expected a whole number, got \"x\"$"):
        item.field("s").integer()
    with pytest.raises(ShapeError, match=r"^items\[0\]\.b: expected a number, got True$"):
        item.field("b").number()  # a JSON true is not 1
    with pytest.raises(ShapeError, match=r"expected a whole number, got a 1001-bit number"):
        Shape(2**1000).integer()
    with pytest.raises(ShapeError, match=r"^the document: expected an object"):
        Shape([1]).field("x")
