"""``ApiKeys``: who may use the api port and the name each caller is shown by (issue 12)."""

from __future__ import annotations

import hmac

import pytest

from gpubroker.api import keys as api_keys
from gpubroker.api.keys import ApiKeys
from gpubroker.config.model import ApiKey
from gpubroker.errors import Unauthorized
from gpubroker.proxy.caller import caller_of, client_name

NIGHTLY = ApiKey("nightly", "nightly-key-0123456789", ("llama3:8b", "reasoner"))
CI = ApiKey("ci", "ci-key-0123456789abcdef")
CLIENT = ("192.0.2.7", 51234)


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"x"), (b"authorization", b"Bearer " + token.encode())]


def test_the_key_names_the_caller() -> None:
    keys = ApiKeys((NIGHTLY, CI))
    assert keys.caller(bearer(NIGHTLY.key), CLIENT) == "nightly"
    assert keys.caller(bearer(CI.key), CLIENT) == "ci"
    assert keys.caller([(b"authorization", b"bearer  " + CI.key.encode())], None) == "ci"
    # a key's name wins over what the client calls itself
    named = [*bearer(CI.key), (b"x-gpubroker-client", b"someone-else")]
    assert keys.caller(named, CLIENT) == "ci"


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"authorization", b"")],
        [(b"authorization", b"Bearer")],
        [(b"authorization", b"Basic " + CI.key.encode())],
        [(b"authorization", CI.key.encode())],
        bearer("wrong-key-0123456789"),
        bearer(CI.key[:-1]),
        bearer(CI.key + "x"),
        bearer(NIGHTLY.key.upper()),
        [(b"x-gpubroker-client", b"nightly")],  # naming yourself is not a key
    ],
)
def test_a_missing_or_wrong_key_is_401_and_never_echoed(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Unauthorized) as info:
        ApiKeys((NIGHTLY, CI)).caller(headers, CLIENT)
    err = info.value
    assert err.status == 401 and err.code == "unauthorized"
    assert (b"www-authenticate", b'Bearer realm="gpubroker"') in err.headers
    for key in (NIGHTLY.key, CI.key, CI.key[:-1]):
        assert key not in str(err)


def test_every_key_is_compared_in_constant_time_with_no_early_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", recording)
    keys = ApiKeys((NIGHTLY, CI))
    for token, expect in ((NIGHTLY.key, "nightly"), (CI.key, "ci"), ("nope" * 5, None)):
        calls.clear()
        try:
            assert keys.caller(bearer(token), CLIENT) == expect
        except Unauthorized:
            assert expect is None
        # the token against each key, in turn, even after the first one matched
        assert calls == [(token.encode(), NIGHTLY.key.encode()), (token.encode(), CI.key.encode())]


def test_without_keys_anyone_passes_named_by_itself_or_its_address() -> None:
    keys = ApiKeys(())
    assert keys.caller([], CLIENT) == "192.0.2.7"
    assert keys.caller(bearer("anything-at-all-000"), CLIENT) == "192.0.2.7"
    assert keys.caller([(b"x-gpubroker-client", b"  nightly-job \t")], CLIENT) == "nightly-job"
    assert keys.caller([], None) == "unknown"
    assert keys.allows("192.0.2.7", "anything")


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (b"nightly-job", "nightly-job"),
        (b" spaced name ", "spaced name"),
        (b"x" * 64, "x" * 64),
        (b"x" * 65, None),  # too long: ignored, not cut
        (b"", None),
        (b"   ", None),
        (b"bell\x07", None),  # no control characters on a status page or terminal
        (b"esc\x1b[31mred", None),
        ("caf\u00e9".encode(), None),  # printable ASCII only
    ],
)
def test_the_client_header_is_trimmed_bounded_and_printable(value: bytes, name: str | None) -> None:
    headers = [(b"x-gpubroker-client", value)]
    assert client_name(headers) == name
    assert caller_of(headers, CLIENT) == (name or "192.0.2.7")


def test_a_key_with_models_may_use_only_those() -> None:
    keys = ApiKeys((NIGHTLY, CI))
    assert keys.allows("nightly", "llama3:8b")
    assert keys.allows("nightly", "reasoner")  # listed by its alias
    assert not keys.allows("nightly", "qwen2.5:14b")
    assert keys.allows("nightly", "qwen2.5:14b", aliases=("reasoner",))  # the alias is listed
    assert keys.allows("ci", "qwen2.5:14b")  # no models: every model
    assert keys.names == {"nightly", "ci"}
