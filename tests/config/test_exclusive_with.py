"""The residency keys: ``exclusiveWith`` and per-model ``pinned``, their rules and locations."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from gpubroker.config.load import describe_config, load_config_file, parse_config
from gpubroker.config.model import ModelSpec, parent_keypath
from gpubroker.config.rules import UnitRef, exclusions, residency_notes
from gpubroker.errors import ConfigError

# Each test fills some <slots>. Lines: backends[0] at 3, its models at 7-9, backends[1] at 10,
# <comfy> from 13; with <comfy> empty, backends[2] at 13, its models at 16, <o2> from 17.
BASE = """\
policy: budget
backends:
  - name: ollama
    proxyPort: 5001
    upstream: http://127.0.0.1:11434
    models:
      - llama3:8b
      - {name: "llama3:70b", aliases: [big]<big>}
      - {name: qwen2.5:14b<qwen>}
  - name: comfyui
    proxyPort: 5002
    upstream: http://127.0.0.1:8188<comfy>
  - name: ollama2
    proxyPort: 5003
    upstream: http://127.0.0.1:11435
    models: [phi3<phi3>]<o2>
"""


def text_for(**parts: str) -> str:
    text = BASE
    for key in ("big", "qwen", "comfy", "phi3", "o2"):
        text = text.replace(f"<{key}>", parts.pop(key, ""))
    assert not parts, parts
    return text


def load(tmp_path: Path, text: str) -> tuple[str, object]:
    path = tmp_path / "gpubroker.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    try:
        return str(path), load_config_file(path)
    except ConfigError as err:
        return str(path), err


def error(tmp_path: Path, **parts: str) -> str:
    path, got = load(tmp_path, text_for(**parts))
    assert isinstance(got, ConfigError), "the config loaded"
    return str(got).replace(path, "FILE")


def test_the_keys_parse_and_default(tmp_path: Path) -> None:
    _, cfg = load(
        tmp_path,
        text_for(
            big=", pinned: true, exclusiveWith: [qwen2.5:14b, comfyui, qwen2.5:14b]",
            comfy="\n    exclusiveWith: phi3",
        ),
    )
    assert not isinstance(cfg, ConfigError), cfg
    ollama, comfyui, ollama2 = cfg.backends  # type: ignore[attr-defined]
    assert ollama.exclusive_with == () and ollama2.exclusive_with == ()
    assert comfyui.exclusive_with == ("phi3",)  # one name needs no list
    assert ollama.models == (
        ModelSpec("llama3:8b"),
        ModelSpec(
            "llama3:70b",
            aliases=("big",),
            pinned=True,
            exclusive_with=("qwen2.5:14b", "comfyui"),  # a name twice counts once
        ),
        ModelSpec("qwen2.5:14b"),
    )


def test_the_keys_round_trip_through_serve_check(tmp_path: Path) -> None:
    """``serve --check`` prints ``to_dict()`` as JSON; it loads back as the same config."""
    _, cfg = load(
        tmp_path,
        text_for(
            big=", vram: 40GiB, exclusiveWith: [qwen2.5:14b]",
            qwen=", pinned: true",
            comfy="\n    exclusiveWith: [big, ollama2]\n    pinned: true",
        ),
    )
    assert not isinstance(cfg, ConfigError), cfg
    out = json.loads(json.dumps(cfg.to_dict()))  # type: ignore[attr-defined]
    assert out["backends"][0]["models"] == [
        "llama3:8b",  # the bare form stays bare
        {"name": "llama3:70b", "aliases": ["big"], "vram": 40 * 2**30,
         "exclusiveWith": ["qwen2.5:14b"]},
        {"name": "qwen2.5:14b", "pinned": True},
    ]  # fmt: skip
    assert out["backends"][1]["exclusiveWith"] == ["big", "ollama2"]
    assert "exclusiveWith" not in out["backends"][0]
    again = parse_config(out, source="again")
    assert replace(again, source=cfg.source) == cfg  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("parts", "where", "message"),
    [
        ({"comfy": "\n    exclusiveWith: []"}, "13:5: backends[1].exclusiveWith",
         "expected a name or a non-empty list of names (backends, or models they declare), "
         "found a list"),
        ({"comfy": "\n    exclusiveWith: [ollama, 3]"}, "13:5: backends[1].exclusiveWith",
         "expected a name or a non-empty list of names (backends, or models they declare), "
         "found a list"),
        ({"qwen": ", pinned: yes"}, "9:29: backends[0].models[2].pinned",
         "expected true or false, found 'yes'"),
        ({"qwen": ", exclusive: [big]"}, "9:29: backends[0].models[2].exclusive",
         "unknown key (did you mean 'exclusiveWith'?)"),
    ],
)  # fmt: skip
def test_wrong_values_are_located(
    tmp_path: Path, parts: dict[str, str], where: str, message: str
) -> None:
    assert error(tmp_path, **parts) == f"FILE:{where}: {message}"


def test_unknown_name_lists_what_can_be_named(tmp_path: Path) -> None:
    got = error(tmp_path, comfy="\n    exclusiveWith:\n      - ollama\n      - lama3:8b")
    assert got == (
        "FILE:15:9: backends[1].exclusiveWith[1]: unknown name 'lama3:8b' in exclusiveWith "
        "(did you mean 'llama3:8b'?); backends are ollama, comfyui, ollama2; declared models "
        "are llama3:8b, llama3:70b, big, qwen2.5:14b, phi3"
    )


def test_unknown_name_when_no_model_is_declared(tmp_path: Path) -> None:
    got = error_text(
        tmp_path,
        """\
        backends:
          - {name: a, proxyPort: 5001, upstream: "http://127.0.0.1:1", exclusiveWith: [llama3]}
        """,
    )
    assert got == (
        "FILE:2:80: backends[0].exclusiveWith[0]: unknown name 'llama3' in exclusiveWith; "
        "backends are a; declared models are none (only models listed under a backend's "
        "`models:` can be named)"
    )


def error_text(tmp_path: Path, text: str) -> str:
    path, got = load(tmp_path, text)
    assert isinstance(got, ConfigError), "the config loaded"
    return str(got).replace(path, "FILE")


def test_a_model_two_backends_declare_is_ambiguous(tmp_path: Path) -> None:
    got = error(tmp_path, phi3=", qwen2.5:14b", comfy="\n    exclusiveWith: [big, qwen2.5:14b]")
    assert got == (
        "FILE:13:26: backends[1].exclusiveWith[1]: model 'qwen2.5:14b' is declared under "
        "ollama and ollama2, so exclusiveWith cannot tell which is meant; name the backend "
        "instead (ollama and ollama2)"
    )
    # Naming the backends instead loads.
    _, cfg = load(
        tmp_path, text_for(phi3=", qwen2.5:14b", comfy="\n    exclusiveWith: [ollama, ollama2]")
    )
    assert not isinstance(cfg, ConfigError), cfg


def test_a_backend_and_a_model_of_one_name_are_ambiguous(tmp_path: Path) -> None:
    got = error(tmp_path, phi3=", comfyui", big=", exclusiveWith: [comfyui]")
    assert got == (
        "FILE:8:62: backends[0].models[1].exclusiveWith[0]: 'comfyui' is both a backend and "
        "a model declared under ollama2, so exclusiveWith cannot tell which is meant; rename "
        "one of them"
    )


@pytest.mark.parametrize(
    ("parts", "where", "message"),
    [
        ({"comfy": "\n    exclusiveWith: [comfyui]"}, "13:21: backends[1].exclusiveWith[0]",
         "backend 'comfyui' names itself: a unit exclusive with itself could never be "
         "resident"),
        ({"o2": "\n    exclusiveWith: [phi3]"}, "17:21: backends[2].exclusiveWith[0]",
         "backend 'ollama2' names its own model 'phi3': the backend's exclusiveWith holds for "
         "each of its models, 'phi3' included, which cannot be exclusive with itself; put "
         "exclusiveWith on the models that must not share the GPU with 'phi3'"),
        ({"o2": "\n    exclusiveWith: [comfyui, big]"}, "17:30: backends[2].exclusiveWith[1]",
         None),  # another backend's model: fine
        # A bare name (no list) is located at its key.
        ({"big": ", exclusiveWith: big"}, "8:46: backends[0].models[1].exclusiveWith[0]",
         "model 'llama3:70b' names itself (as 'big'): a unit exclusive with itself could never "
         "be resident"),
        ({"qwen": ", exclusiveWith: [ollama]"}, "9:45: backends[0].models[2].exclusiveWith[0]",
         "model 'qwen2.5:14b' names its own backend 'ollama', which includes the model itself, "
         "and a unit exclusive with itself could never be resident; name the backend's other "
         "models instead"),
    ],
)  # fmt: skip
def test_a_unit_cannot_be_exclusive_with_itself(
    tmp_path: Path, parts: dict[str, str], where: str, message: str | None
) -> None:
    path, got = load(tmp_path, text_for(**parts))
    if message is None:
        assert not isinstance(got, ConfigError), got
    else:
        assert str(got).replace(path, "FILE") == f"FILE:{where}: {message}"


def test_sibling_models_may_exclude_each_other(tmp_path: Path) -> None:
    """Two big models of one Ollama: each fits alone, never both (nor both pinned-free)."""
    _, cfg = load(tmp_path, text_for(big=", exclusiveWith: [qwen2.5:14b]"))
    assert not isinstance(cfg, ConfigError), cfg
    assert exclusions(cfg.backends) == {  # type: ignore[attr-defined]
        UnitRef("ollama", "llama3:70b"): frozenset({UnitRef("ollama", "qwen2.5:14b")}),
        UnitRef("ollama", "qwen2.5:14b"): frozenset({UnitRef("ollama", "llama3:70b")}),
    }


@pytest.mark.parametrize(
    ("parts", "where", "why"),
    [
        ({"comfy": "\n    pinned: true\n    exclusiveWith: [ollama2]",
          "o2": "\n    pinned: true"},
         "14:21: backends[1].exclusiveWith[0]",
         "backend 'comfyui' is pinned and backend 'ollama2' is pinned"),
        ({"comfy": "\n    pinned: true\n    exclusiveWith: [big]", "big": ", pinned: true"},
         "14:21: backends[1].exclusiveWith[0]",
         "backend 'comfyui' is pinned and model 'ollama/llama3:70b' is pinned"),
        ({"comfy": "\n    pinned: true\n    exclusiveWith: [ollama]", "qwen": ", pinned: true"},
         "14:21: backends[1].exclusiveWith[0]",
         "backend 'comfyui' is pinned and backend 'ollama' has pinned model 'qwen2.5:14b'"),
        ({"o2": "\n    pinned: true\n    exclusiveWith: [qwen2.5:14b]",
          "qwen": ", pinned: true"},
         "18:21: backends[2].exclusiveWith[0]",
         "backend 'ollama2' is pinned and model 'ollama/qwen2.5:14b' is pinned"),
        ({"phi3": ", {name: mistral, exclusiveWith: [phi3]}", "o2": "\n    pinned: true"},
         "16:52: backends[2].models[1].exclusiveWith[0]",
         "model 'ollama2/mistral' is pinned with its backend and model 'ollama2/phi3' is "
         "pinned with its backend"),
    ],
)  # fmt: skip
def test_two_pinned_units_cannot_exclude_each_other(
    tmp_path: Path, parts: dict[str, str], where: str, why: str
) -> None:
    assert error(tmp_path, **parts) == (
        f"FILE:{where}: {why}: exclusive, they could never both be resident, yet neither may "
        "be evicted; unpin one or drop this entry"
    )


@pytest.mark.parametrize(
    "parts",
    [
        # A pinned model of a pinned backend is only said twice, and may exclude the unpinned.
        {"phi3": ", {name: m, pinned: true, exclusiveWith: [comfyui]}",
         "o2": "\n    pinned: true"},
        # One pinned side is fine: the other one gives way.
        {"comfy": "\n    pinned: true\n    exclusiveWith: [ollama, phi3]"},
        {"big": ", pinned: true, exclusiveWith: [qwen2.5:14b, comfyui]"},
        # Both sides naming each other is allowed (one is enough).
        {"comfy": "\n    exclusiveWith: [big]", "big": ", exclusiveWith: [comfyui]"},
    ],
)  # fmt: skip
def test_what_the_rules_allow(tmp_path: Path, parts: dict[str, str]) -> None:
    _, cfg = load(tmp_path, text_for(**parts))
    assert not isinstance(cfg, ConfigError), cfg


def test_exclusions_are_symmetric_and_resolve_aliases(tmp_path: Path) -> None:
    _, cfg = load(
        tmp_path,
        text_for(
            comfy="\n    exclusiveWith: [big, ollama2]",
            big=", exclusiveWith: [comfyui]",  # the other side too: said once in the result
        ),
    )
    assert not isinstance(cfg, ConfigError), cfg
    big, comfyui, ollama2 = UnitRef("ollama", "llama3:70b"), UnitRef("comfyui"), UnitRef("ollama2")
    assert exclusions(cfg.backends) == {  # type: ignore[attr-defined]
        comfyui: frozenset({big, ollama2}),
        big: frozenset({comfyui}),
        ollama2: frozenset({comfyui}),
    }
    assert (str(big), str(comfyui)) == ("ollama/llama3:70b", "comfyui")


def test_exclusions_of_an_unchecked_config_refuse_what_they_cannot_resolve() -> None:
    from gpubroker.config.model import BackendConfig

    b = BackendConfig("a", 5001, "http://127.0.0.1:1", exclusive_with=("nobody",))
    with pytest.raises(ValueError, match="unknown name 'nobody'"):
        exclusions((b,))


def test_rules_of_plain_dicts_are_checked_without_locations() -> None:
    data = {
        "backends": [
            {"name": "a", "proxyPort": 5001, "upstream": "http://127.0.0.1:1"},
            {"name": "b", "proxyPort": 5002, "upstream": "http://127.0.0.1:2",
             "exclusiveWith": ["a", "c"]},
        ]
    }  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="test")
    assert str(info.value).startswith(
        "test: backends[1].exclusiveWith[1]: unknown name 'c' in exclusiveWith"
    )


def test_under_exclusive_the_rules_are_accepted_and_noted(tmp_path: Path) -> None:
    text = text_for(comfy="\n    exclusiveWith: [big]", qwen=", pinned: true")
    _, cfg = load(tmp_path, text.replace("policy: budget", "policy: exclusive"))
    assert not isinstance(cfg, ConfigError), cfg
    note = (
        "note: exclusiveWith and pinned models change nothing under policy: exclusive (one "
        "backend holds the GPU at a time); they apply under policy: budget"
    )
    assert residency_notes(cfg) == (note,)  # type: ignore[arg-type]
    assert describe_config(cfg).splitlines()[-1] == note  # type: ignore[arg-type]
    _, cfg = load(tmp_path, text)  # budget: no note
    assert residency_notes(cfg) == ()  # type: ignore[arg-type]
    _, cfg = load(tmp_path, text_for().replace("policy: budget", "policy: exclusive"))
    assert residency_notes(cfg) == ()  # type: ignore[arg-type]  # nothing set: nothing said


def test_errors_about_an_item_find_its_location(tmp_path: Path) -> None:
    """Later checks (the scheduler's domains) point at the item through ``Config.error``."""
    _, cfg = load(tmp_path, text_for(comfy="\n    exclusiveWith:\n      - ollama\n      - big"))
    assert not isinstance(cfg, ConfigError), cfg
    err = cfg.error("backends[1].exclusiveWith[1]", "x")  # type: ignore[attr-defined]
    assert (err.line, err.column) == (15, 9)
    err = cfg.error("backends[1].exclusiveWith[7]", "x")  # type: ignore[attr-defined]
    assert (err.line, err.column) == (13, 5)  # the nearest located parent: the key
    assert [parent_keypath(k) for k in ("a.b[2]", "a.b", "a[0]", "a", "")] == [
        "a.b",
        "a",
        "a",
        "",
        "",
    ]
