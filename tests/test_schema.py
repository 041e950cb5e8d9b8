"""Strict configs: keys, types, overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mmssl.schema import (
    ConfigError,
    DuplicateKeyError,
    apply_overrides,
    from_dict,
    load_yaml,
    to_dict,
)


@dataclass
class Inner:
    a: int = 1
    b: float = 0.5


@dataclass
class Outer:
    inner: Inner = field(default_factory=lambda: Inner(a=7))
    names: list[str] = field(default_factory=list)
    mode: str = "x"
    opt: int | None = None


def test_round_trip_and_partial_section_keeps_field_default():
    cfg = from_dict(Outer, {"inner": {"b": 2}, "names": ["p"]})
    assert cfg == Outer(inner=Inner(a=7, b=2.0), names=["p"])
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, match",
    [
        ({"inner": {"c": 1}}, r"unknown key 'inner\.c'"),
        ({"inenr": {}}, r"unknown key 'inenr' \(did you mean 'inner'\?\)"),
        ({"inner": {"a": "two"}}, r"inner\.a: expected an integer"),
        ({"inner": {"a": True}}, r"inner\.a: expected an integer"),
        ({"names": "p"}, r"names: expected a list"),
        ({"opt": 1.5}, r"opt"),
    ],
)
def test_errors_name_the_dotted_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Outer, data)


def test_yaml11_exponent_strings_are_floats():
    assert from_dict(Inner, {"b": "3e-4"}).b == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(Inner, {"b": "fast"})


def test_overrides():
    data = apply_overrides({"inner": {"a": 1}}, ["inner.b=2.5", "names=[x, y]", "opt=3"])
    assert from_dict(Outer, data) == Outer(inner=Inner(a=1, b=2.5), names=["x", "y"], opt=3)
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["inner.b"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"mode": "x"}, ["mode.sub=1"])


def test_override_values_yaml_would_misread_stay_text():
    def value(text: str):
        return apply_overrides({}, [f"mode={text}"])["mode"]

    for text in ["12:30", "010", "0x10", "0b11", "&x", "a photo #3"]:
        assert value(text) == text  # not 750, 8, 16, 3, None, "a photo"
    assert [value(t) for t in ["0", "10", "1.5", "true", "null"]] == [0, 10, 1.5, True, None]
    with pytest.raises(ConfigError, match="inner.a: expected an integer"):
        from_dict(Outer, apply_overrides({}, ["inner.a=010"]))


def test_yaml_11_octal_and_base_60_numbers_in_a_file_stay_text():
    """`steps: 0400` read as 256 and `every: 1:40` as 100, inside files and inside flow
    values on the command line, where a plain command-line scalar was already refused."""
    data = load_yaml("a: 0400\nb: 1:40\nc: 1:30.5\nd: 0x10\ne: 12\nf: 0\ng: [010, 3]\nh: 1.5")
    assert data == {"a": "0400", "b": "1:40", "c": "1:30.5", "d": 16, "e": 12, "f": 0,
                    "g": ["010", 3], "h": 1.5}  # fmt: skip
    with pytest.raises(ConfigError, match="inner.a: expected an integer"):
        from_dict(Outer, load_yaml("inner: {a: 010}"))
    with pytest.raises(ConfigError, match="inner.a: expected an integer"):
        from_dict(Outer, apply_overrides({}, ["inner={a: 010}"]))


def test_an_override_of_an_aliased_section_changes_that_section_only():
    """`b: *a` loads as the very object `a` is, and the copy the overrides were applied to
    (a YAML round trip) kept it shared: overriding a.x changed b.x too."""
    data = load_yaml("a: &src {x: 64, y: {z: 1}}\nb: *src\nc: {<<: *src, x: 2}")
    out = apply_overrides(data, ["a.x=1", "a.y.z=5"])
    assert out == {"a": {"x": 1, "y": {"z": 5}}, "b": {"x": 64, "y": {"z": 1}},
                   "c": {"x": 2, "y": {"z": 1}}}  # fmt: skip


def test_a_key_given_twice_in_yaml_is_an_error_not_the_last_value():
    # PyYAML keeps the last of two equal keys: a recipe repeating `train:` lost the first
    # section's settings without a word
    with pytest.raises(DuplicateKeyError, match=r"duplicate key 'train', first on line 1"):
        load_yaml("train:\n  steps: 3\nname: x\ntrain:\n  seed: 1\n")
    with pytest.raises(DuplicateKeyError, match="duplicate key 'a'"):
        load_yaml("s: {a: 1, b: 2, a: 3}\n")
    # a merge key's values may still be overridden, and equal keys in two mappings are fine
    text = "base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  x: 5\nother: {x: 1}\n"
    assert load_yaml(text) == {"base": {"x": 1, "y": 2}, "run": {"x": 5, "y": 2}, "other": {"x": 1}}
    with pytest.raises(
        ConfigError, match=r"override 'inner': duplicate key 'a' in '\{a: 1, a: 2\}'"
    ):
        apply_overrides({}, ["inner={a: 1, a: 2}"])


def test_override_text_that_yaml_reads_as_a_date_or_block_collection_stays_text():
    # `name=2024-06-01` failed as "expected a string, got datetime.date(2024, 6, 1)", and a
    # prompt with ": " as "expected a string, got {...}": the command line takes scalars and
    # flow collections only
    def value(text: str):
        return apply_overrides({}, [f"mode={text}"])["mode"]

    for text in ["2024-06-01", "2024-06-01 10:00:00", "a photo of the digit: 3", "- draft"]:
        assert value(text) == text
        assert from_dict(Outer, apply_overrides({}, [f"mode={text}"])).mode == text
    assert value("[a, b]") == ["a", "b"] and value(" {a: 1}") == {"a": 1}
    assert value("{a: [1, 2], b: x: y}") == "{a: [1, 2], b: x: y}"  # not YAML: text as before


def test_yaml_that_expands_past_the_limit_is_refused_before_any_copy(tmp_path):
    """A "billion laughs" of aliases (9 levels of 9) loads as shared objects in no time, but
    the recipe code copied it out in full: 1.25 GB and a MemoryError traceback."""
    from mmssl.train.recipe import read_yaml

    lines = ['x0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        lines.append(f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_yaml("\n".join(lines))
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines))
    with pytest.raises(ConfigError, match="laughs.yaml.*expands to more than"):
        read_yaml(path)
    # an alias inside its own anchor: a structure that contains itself (it was a
    # RecursionError traceback in the counting)
    for text in ("x: &a [*a]", "train: &a {steps: *a}"):
        with pytest.raises(ConfigError, match="alias inside its own anchor"):
            load_yaml(text)
    # aliases within reason (a merged base section) load as before
    data = load_yaml("base: &b {lr: 1, wd: 2}\nrun: {<<: *b, lr: 3}\nlist: [*b, *b]")
    assert data["run"] == {"lr": 3, "wd": 2} and data["list"] == [{"lr": 1, "wd": 2}] * 2


@dataclass
class WithSections:
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    named: dict[str, Inner] = field(default_factory=dict)
    plain: dict[str, int] = field(default_factory=dict)


@dataclass
class Nest:
    outer: WithSections = field(default_factory=WithSections)


def test_a_mapping_override_merges_into_a_section_and_replaces_other_fields():
    # `train={steps: 5}` replaced the recipe's whole train section: its other keys fell back
    # to the defaults without a word
    data = {"inner": {"a": 3, "b": 2.0}, "maybe": {"a": 4}, "named": {"x": {"a": 5, "b": 1.0}},
            "plain": {"p": 1, "q": 2}}  # fmt: skip
    out = apply_overrides(
        data,
        ["inner={b: 9.0}", "maybe={b: 8.0}", "named.x={b: 7.0}", "plain={q: 3}"],
        schema=WithSections,
    )
    assert out["inner"] == {"a": 3, "b": 9.0} and out["maybe"] == {"a": 4, "b": 8.0}
    assert out["named"] == {"x": {"a": 5, "b": 7.0}}  # a dict field's entry is a section
    assert out["plain"] == {"q": 3}  # a dict field given whole is replaced
    assert apply_overrides(data, ["named={y: {a: 1}}"], schema=WithSections)["named"] == {
        "y": {"a": 1}
    }
    assert from_dict(WithSections, out).inner == Inner(a=3, b=9.0)
    # inside a merged section, a section merges and a mapping field is replaced, as above
    nested = {"outer": {"inner": {"a": 3}, "plain": {"p": 1}}}
    out = apply_overrides(nested, ["outer={inner: {b: 2.0}, plain: {q: 2}}"], schema=Nest)
    assert out == {"outer": {"inner": {"a": 3, "b": 2.0}, "plain": {"q": 2}}}


def test_a_key_yaml_reads_as_a_boolean_or_number_is_an_unknown_key_not_a_crash():
    # `on:` in a section ended in "TypeError: attribute name must be string, not 'bool'"
    for text, key in [("inner:\n  on: 1\n", "inner.True"), ("inner: {1: 2}\n", "inner.1")]:
        with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
            from_dict(Outer, load_yaml(text))
    with pytest.raises(ConfigError, match="YAML reads the keys on, off"):
        from_dict(Outer, load_yaml("yes: 1\n"))


def test_a_json_config_naming_a_key_twice_is_an_error_not_the_last_value():
    from mmssl.schema import strict_json

    with pytest.raises(ConfigError, match="key 'zero_optimization' is given twice"):
        strict_json('{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match="key 'stage' is given twice"):
        strict_json('{"zero_optimization": {"stage": 1, "stage": 3}}')
    assert strict_json('{"a": {"x": 1}, "b": {"x": 2}}') == {"a": {"x": 1}, "b": {"x": 2}}


def test_a_mapping_fields_key_yaml_reads_as_a_boolean_or_null_is_refused():
    # `sources: {on: ...}` became a source named "True"
    for text in ("plain: {on: 1}\n", "plain: {null: 1}\n", "named: {no: {a: 1}}\n"):
        with pytest.raises(
            ConfigError, match=r"^(plain|named): key (True|False|None) \(YAML reads"
        ):
            from_dict(WithSections, load_yaml(text))
    assert from_dict(WithSections, load_yaml("plain: {'on': 1, 7: 2}\n")).plain == {"on": 1, "7": 2}


def test_a_json_config_files_problems_name_the_file(tmp_path):
    from mmssl.schema import read_json_config

    for name, data, said in [
        ("dup.json", b'{"a": 1, "a": 2}', r"dup\.json: key 'a' is given twice"),
        ("bad.json", b'{"a": ', r"bad\.json: not valid JSON \("),
        (
            "latin.json",
            b'{"a": "caf\xe9"}',
            r"latin\.json: not UTF-8 text \(invalid .* at byte 10\)",
        ),
    ]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=said):
            read_json_config(tmp_path / name)
    (tmp_path / "ok.json").write_text('{"a": {"b": 1}}')
    assert read_json_config(tmp_path / "ok.json") == {"a": {"b": 1}}
