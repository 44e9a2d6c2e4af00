from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gpubroker.config.load import (
    config_from_env,
    default_config_paths,
    describe_config,
    load_config_file,
    parse_config,
    resolve_config,
)
from gpubroker.config.model import DEFAULT_STATUS_PORT, BackendConfig, GpuSpec
from gpubroker.errors import ConfigError

ONEGPU4ALL = """\
# an onegpu4all.yaml as OneGPU4All users have it
statusPort: 5102
backends:
  - name: ollama
    proxyPort: 5001
    upstream: http://localhost:11434
    unloadStrategy: ollama
  - name: comfyui
    proxyPort: 5002
    upstream: http://localhost:8188
    unloadStrategy: comfyui
  - name: whisper
    proxyPort: 5003
    upstream: http://127.0.0.1:9000/
    unloadStrategy: generic
    unloadEndpoint: /unload
"""


def write(tmp_path: Path, text: str, name: str = "gpubroker.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_for(tmp_path: Path, text: str) -> tuple[str, ConfigError]:
    """Load ``text`` and return (the file's path, the ConfigError it must raise)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    return str(path), info.value


def test_onegpu4all_file_loads_unchanged(tmp_path: Path) -> None:
    cfg = load_config_file(write(tmp_path, ONEGPU4ALL, "onegpu4all.yaml"))
    assert cfg.status_port == 5102
    assert [b.name for b in cfg.backends] == ["ollama", "comfyui", "whisper"]
    ollama, comfyui, whisper = cfg.backends
    assert ollama == BackendConfig(
        name="ollama", proxy_port=5001, upstream="http://localhost:11434", unload_strategy="ollama"
    )
    assert comfyui.upstream == "http://localhost:8188"
    assert whisper.upstream == "http://127.0.0.1:9000"  # trailing slash dropped
    assert whisper.unload_endpoint == "/unload"
    assert whisper.classifier_name == "generic"
    # The extensions keep their safe defaults.
    assert cfg.policy == "exclusive"
    assert cfg.bind == "127.0.0.1"
    assert cfg.gpus == "auto"
    assert cfg.queue_timeout == 120.0
    assert ollama.priority == 0 and not ollama.pinned and ollama.vram is None
    assert ollama.gpu == () and ollama.gpu_paths is None and ollama.command is None


def test_extensions_are_typed(tmp_path: Path) -> None:
    cfg = load_config_file(
        write(
            tmp_path,
            """\
            statusPort: 6000
            bind: 192.0.2.10
            policy: budget
            queueTimeout: 2m
            unloadTimeout: 250ms
            holdTime: 5
            shutdownGrace: 1.5h
            adminToken: s3cret
            telemetry: none
            disablePlugins: [sdwebui]
            gpus:
              - {id: 0, memory: 24GiB, reserve: 1GiB}
              - GPU-8d3b1c7e-0000-0000-0000-000000000000
            backends:
              - name: vllm
                proxyPort: 5003
                upstream: https://gpu-box.local:8000
                unloadStrategy: vllm
                classifier: openai
                sleepLevel: 2
                vram: 18GiB
                priority: 3
                pinned: true
                gpu: [0, "1"]
                maxConcurrency: 8
                healthPath: /health
                gpuPaths: ["/v1/*", "PUT /train"]
                command: [vllm, serve, model, --port, "{port}"]
                env: {VLLM_SERVER_DEV_MODE: 1}
                cwd: /srv
                idleTimeout: never
                startTimeout: 5m
                stopTimeout: 20s
                autostart: true
                restart: always
            """,
        )
    )
    assert cfg.status_port == 6000
    assert cfg.bind == "192.0.2.10"
    assert cfg.policy == "budget"
    assert (cfg.queue_timeout, cfg.unload_timeout, cfg.hold_time) == (120.0, 0.25, 5.0)
    assert cfg.shutdown_grace == 5400.0
    assert cfg.admin_token == "s3cret"
    assert cfg.telemetry == "none"
    assert cfg.disable_plugins == ("sdwebui",)
    assert cfg.gpus == (
        GpuSpec(id=0, memory=24 * 2**30, reserve=2**30),
        GpuSpec(id="GPU-8d3b1c7e-0000-0000-0000-000000000000"),
    )
    (b,) = cfg.backends
    assert b.sleep_level == 2 and isinstance(b.sleep_level, int)
    assert b.classifier_name == "openai"
    assert b.vram == 18 * 2**30
    assert (b.priority, b.pinned, b.gpu, b.max_concurrency) == (3, True, (0, 1), 8)
    assert b.gpu_paths == ("/v1/*", "PUT /train")
    assert b.command == ("vllm", "serve", "model", "--port", "{port}")
    assert b.env == {"VLLM_SERVER_DEV_MODE": "1"}
    assert b.idle_timeout is None
    assert (b.start_timeout, b.stop_timeout) == (300.0, 20.0)
    assert (b.autostart, b.restart, b.cwd) == (True, "always", "/srv")
    assert cfg.backend("vllm") is b
    with pytest.raises(KeyError):
        cfg.backend("nope")


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    cfg = load_config_file(write(tmp_path, ""))
    assert cfg.backends == ()
    assert cfg.status_port == DEFAULT_STATUS_PORT


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    path, err = error_for(
        tmp_path,
        """\
        statusPort: 5102
        backends:
          - name: ollama
            proxyPrt: 5001
            upstream: http://127.0.0.1:11434
        """,
    )
    assert (err.line, err.column, err.keypath) == (4, 5, "backends[0].proxyPrt")
    assert str(err) == (
        f"{path}:4:5: backends[0].proxyPrt: unknown key (did you mean 'proxyPort'?)"
    )


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path, err = error_for(tmp_path, "statusPort: 5102\nstausPort: 1\n")
    assert str(err) == f"{path}:2:1: stausPort: unknown key (did you mean 'statusPort'?)"
    path, err = error_for(tmp_path, "zzz: 1\n")
    assert str(err).startswith(f"{path}:1:1: zzz: unknown key (known keys: statusPort, bind,")


def test_bad_url(tmp_path: Path) -> None:
    path, err = error_for(
        tmp_path,
        """\
        backends:
          - name: ollama
            proxyPort: 5001
            upstream: ftp://127.0.0.1:11434
        """,
    )
    assert str(err) == (
        f"{path}:4:5: backends[0].upstream: expected an http:// or https:// URL with a host "
        "and no path, such as http://127.0.0.1:11434, found 'ftp://127.0.0.1:11434'"
    )


@pytest.mark.parametrize("url", ["localhost:11434", "http://", "http://host:99999", "12"])
def test_more_bad_urls(tmp_path: Path, url: str) -> None:
    _, err = error_for(
        tmp_path, f"backends:\n  - name: a\n    proxyPort: 5001\n    upstream: {url}\n"
    )
    assert (err.line, err.column, err.keypath) == (4, 5, "backends[0].upstream")
    assert "expected an http:// or https:// URL" in err.message


def test_port_out_of_range(tmp_path: Path) -> None:
    path, err = error_for(
        tmp_path,
        """\
        statusPort: 5102
        backends:
          - name: ollama
            upstream: http://127.0.0.1:11434
            proxyPort: 70000
        """,
    )
    assert str(err) == (
        f"{path}:5:5: backends[0].proxyPort: expected a port number from 1 to 65535, found 70000"
    )
    path, err = error_for(tmp_path, "statusPort: 0\n")
    assert str(err) == f"{path}:1:1: statusPort: expected a port number from 1 to 65535, found 0"


def test_duplicate_names(tmp_path: Path) -> None:
    path, err = error_for(
        tmp_path,
        """\
        backends:
          - name: ollama
            proxyPort: 5001
            upstream: http://127.0.0.1:11434
          - name: ollama
            proxyPort: 5002
            upstream: http://127.0.0.1:11435
        """,
    )
    assert str(err) == (
        f"{path}:5:5: backends[1].name: duplicate backend name 'ollama' (also backends[0])"
    )


def test_duplicate_ports(tmp_path: Path) -> None:
    path, err = error_for(
        tmp_path,
        """\
        backends:
          - name: ollama
            proxyPort: 5001
            upstream: http://127.0.0.1:11434
          - name: comfyui
            upstream: http://127.0.0.1:8188
            proxyPort: 5001
        """,
    )
    assert str(err) == (
        f"{path}:7:5: backends[1].proxyPort: port 5001 is already used by backends[0] (ollama)"
    )


def test_proxy_port_equal_to_status_port(tmp_path: Path) -> None:
    path, err = error_for(
        tmp_path,
        """\
        statusPort: 5001
        backends:
          - {name: ollama, proxyPort: 5001, upstream: "http://127.0.0.1:11434"}
        """,
    )
    assert str(err) == (
        f"{path}:3:20: backends[0].proxyPort: port 5001 is the statusPort; "
        "give this backend another port"
    )


def test_default_status_port_clash(tmp_path: Path) -> None:
    _, err = error_for(
        tmp_path, "backends:\n  - {name: a, proxyPort: 5102, upstream: 'http://127.0.0.1:1'}\n"
    )
    assert (err.line, err.keypath) == (2, "backends[0].proxyPort")
    assert "is the statusPort" in err.message


@pytest.mark.parametrize(
    ("bind", "upstream", "what"),
    [
        (None, "http://127.0.0.1:5001", "ollama's proxyPort"),
        (None, "http://localhost:5002", "comfyui's proxyPort"),
        (None, "http://[::1]:5102", "statusPort"),
        (None, "http://0.0.0.0:5001", "ollama's proxyPort"),
        ("192.0.2.7", "http://192.0.2.7:5002", "comfyui's proxyPort"),
        ("0.0.0.0", "http://127.0.0.9:5102", "statusPort"),
        (None, "http://LOCALHOST.:5001", "ollama's proxyPort"),
    ],
)
def test_upstream_pointing_at_the_brokers_own_port_is_refused(
    tmp_path: Path, bind: str | None, upstream: str, what: str
) -> None:
    """Such a config forwards every request to itself until the pool and fds run out."""
    path, err = error_for(
        tmp_path,
        (f"bind: {bind}\n" if bind else "")
        + "backends:\n"
        + "  - {name: ollama, proxyPort: 5001, upstream: 'http://127.0.0.1:11434'}\n"
        + "  - name: comfyui\n"
        + "    proxyPort: 5002\n"
        + f"    upstream: '{upstream}'\n",
    )
    line = 6 if bind else 5
    assert str(err) == (
        f"{path}:{line}:5: backends[1].upstream: {upstream} is this broker's own {what}: "
        "requests would loop through the broker; point upstream at the service itself"
    )


@pytest.mark.parametrize(
    "upstream",
    [
        "http://127.0.0.1:5003",
        "http://192.0.2.7:5001",
        "http://gpu-box:5001",
        "http://127.0.0.2:5001",
    ],
)
def test_upstream_on_another_port_or_host_is_not_a_loop(tmp_path: Path, upstream: str) -> None:
    cfg = load_config_file(
        write(tmp_path, f"backends:\n  - {{name: a, proxyPort: 5001, upstream: '{upstream}'}}\n")
    )
    assert cfg.backends[0].upstream == upstream


@pytest.mark.parametrize(
    ("line", "keypath", "message"),
    [
        ('pinned: "yes"', "backends[0].pinned", "expected true or false, found 'yes'"),
        ("priority: high", "backends[0].priority", "expected an integer, found 'high'"),
        ("priority: 1.5", "backends[0].priority", "expected an integer, found 1.5"),
        ("maxConcurrency: 0", "backends[0].maxConcurrency",
         "expected an integer of at least 1, found 0"),
        ("sleepLevel: 3", "backends[0].sleepLevel", "expected one of 1, 2, found 3"),
        ("sleepLevel: true", "backends[0].sleepLevel", "expected one of 1, 2, found true"),
        ("restart: sometimes", "backends[0].restart",
         "expected one of on-failure, always, never, found 'sometimes'"),
        ("unloadEndpoint: unload", "backends[0].unloadEndpoint",
         "expected a URL path starting with /, found 'unload'"),
        ("gpu: []", "backends[0].gpu", "expected a GPU index or UUID, or a non-empty list of them,"
         " found a list"),
        ("gpu: first", "backends[0].gpu", "expected a GPU index (0, 1, …) or UUID (GPU-…), "
         "found 'first'"),
        ("gpuPaths: [generate]", "backends[0].gpuPaths",
         'expected a list of paths such as "/api/generate" or "POST /v1/*", found a list'),
        ("command: llama-server", "backends[0].command",
         "expected a non-empty list of strings, found 'llama-server'"),
        ("env: [A=1]", "backends[0].env", "expected a mapping of variable names to values, "
         "found a list"),
        ("vram: lots", "backends[0].vram", "expected a size such as 9GiB or 512MiB, found 'lots'"),
        ("vram: -1", "backends[0].vram", "expected a size that is not negative, found -1"),
        ("idleTimeout: later", "backends[0].idleTimeout",
         "expected a duration such as 10s, 2m or 250ms, found 'later'"),
        ("startTimeout: 1 day", "backends[0].startTimeout",
         "expected a duration such as 10s, 2m or 250ms, found '1 day'"),
    ],
)  # fmt: skip
def test_wrong_types_in_a_backend(tmp_path: Path, line: str, keypath: str, message: str) -> None:
    path, err = error_for(
        tmp_path,
        "backends:\n"
        "  - name: ollama\n"
        "    proxyPort: 5001\n"
        "    upstream: http://127.0.0.1:11434\n"
        f"    {line}\n",
    )
    assert str(err) == f"{path}:5:5: {keypath}: {message}"


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("queueTimeout: soon\n", "1:1: queueTimeout",
         "expected a duration such as 10s, 2m or 250ms, found 'soon'"),
        ("statusPort: 5102\nholdTime: -3\n", "2:1: holdTime",
         "expected a duration that is not negative, found -3"),
        ("unloadTimeout: .nan\n", "1:1: unloadTimeout",
         "expected a duration that is not negative, found nan"),
        ("policy: fair\n", "1:1: policy", "expected one of exclusive, budget, found 'fair'"),
        ("statusPort: http\n", "1:1: statusPort",
         "expected a port number from 1 to 65535, found 'http'"),
        ("disablePlugins: sdwebui\n", "1:1: disablePlugins",
         "expected a non-empty list of strings, found 'sdwebui'"),
        ("gpus: all\n", "1:1: gpus", "expected auto or a list of GPUs, found 'all'"),
        ("allowedHosts: [gpu.lan, 'http://box:5102']\n", "1:1: allowedHosts",
         'expected host names such as "gpu.lan", "*.lan" or "192.168.1.5" (no scheme, port or '
         "path) instead of 'http://box:5102', found a list"),
        ("gpus:\n  - id: 0\n    memory: 24GiB\n  - id: x\n", "4:5: gpus[1].id",
         "expected a GPU index (0, 1, …) or UUID (GPU-…), found 'x'"),
        ("gpus:\n  - id: 0\n    memry: 24GiB\n", "3:5: gpus[0].memry",
         "unknown key (did you mean 'memory'?)"),
        ("gpus:\n  - memory: 24GiB\n", "2:5: gpus[0]",
         "missing required key 'id' (a GPU index or UUID)"),
        ("backends:\n  name: a\n", "1:1: backends", "expected a list of backends, found a mapping"),
        ("backends:\n  - name: [a, b]\n", "2:5: backends[0].name",
         "expected a non-empty string, found a list"),
        ("backends:\n  - ollama\n", "2:5: backends[0]",
         "expected a mapping at backends[0], found 'ollama'"),
        ("backends:\n  - name: a\n    proxyPort: 5001\n", "2:5: backends[0]",
         "missing required key 'upstream'"),
    ],
)  # fmt: skip
def test_top_level_errors(tmp_path: Path, text: str, where: str, message: str) -> None:
    path, err = error_for(tmp_path, text)
    assert str(err) == f"{path}:{where}: {message}"


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path, err = error_for(tmp_path, "- ollama\n- comfyui\n")
    assert str(err) == f"{path}: expected a mapping at the top level, found a list"


@pytest.mark.parametrize(
    ("text", "line", "column", "problem"),
    [
        ("backends:\n  - name: a\n    proxyPort: [5001\n", 4, 1,
         "expected ',' or ']', but got '<stream end>'"),
        ("statusPort: 5102\n  policy: budget\n", 2, 9, "mapping values are not allowed here"),
        ("statusPort:\t5102\n", 1, 12, "found character '\\t' that cannot start any token"),
        ("statusPort: 1\nstatusPort: 2\n", 2, 1,
         'found duplicate key "statusPort" with value "2" (original value: "1")'),
    ],
)  # fmt: skip
def test_invalid_yaml_is_located(
    tmp_path: Path, text: str, line: int, column: int, problem: str
) -> None:
    path, err = error_for(tmp_path, text)
    assert (err.line, err.column, err.keypath) == (line, column, None)
    assert str(err) == f"{path}:{line}:{column}: invalid YAML: {problem}"
    assert "\n" not in str(err)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_file(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: no such file"
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"statusPort: 5102 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: cannot read: "):
        load_config_file(bad)


def test_config_error_points_at_nearest_located_parent(tmp_path: Path) -> None:
    cfg = load_config_file(write(tmp_path, ONEGPU4ALL))
    err = cfg.error("backends[1].unloadStrategy", "unknown strategy")
    assert (err.line, err.column) == (11, 5)
    err = cfg.error("backends[2].classifier", "no classifier")  # not in the file: its backend
    assert (err.line, err.column, err.keypath) == (12, 5, "backends[2].classifier")
    assert cfg.error("telemetry", "x").line is None


def test_parse_config_accepts_plain_dicts() -> None:
    cfg = parse_config(
        {"backends": [{"name": "a", "proxyPort": "5001", "upstream": "http://127.0.0.1:1"}]}
    )
    assert cfg.backends[0].proxy_port == 5001
    with pytest.raises(ConfigError) as info:
        parse_config({"backends": [{"name": "a", "proxyPort": 5001}]}, source="test")
    assert str(info.value) == "test: backends[0]: missing required key 'upstream'"


def test_allowed_hosts_are_kept_as_the_host_check_compares_them() -> None:
    hosts = ["GPU.Lan", "*.Corp.example", "[::1]", "192.168.1.5"]
    cfg = parse_config({"allowedHosts": hosts, "backends": []})
    assert cfg.allowed_hosts == ("gpu.lan", "*.corp.example", "::1", "192.168.1.5")


def test_to_dict_uses_the_file_keys(tmp_path: Path) -> None:
    cfg = load_config_file(write(tmp_path, ONEGPU4ALL))
    out = cfg.to_dict()
    assert out["statusPort"] == 5102
    assert out["gpus"] == "auto"
    assert out["backends"][2]["unloadEndpoint"] == "/unload"
    assert out["backends"][0]["proxyPort"] == 5001
    assert out["backends"][0]["sleepLevel"] == 1


def test_describe_config(tmp_path: Path) -> None:
    cfg = load_config_file(write(tmp_path, ONEGPU4ALL))
    text = describe_config(cfg)
    assert text.splitlines()[0] == f"config: {tmp_path / 'gpubroker.yaml'}"
    assert "status: http://127.0.0.1:5102" in text
    assert "  ollama: :5001 -> http://localhost:11434 (strategy ollama, classifier ollama)" in text


# --- the env-var quick mode and where a config is looked for ---------------------------------


def test_quick_mode_from_env() -> None:
    cfg = config_from_env(
        {
            "OLLAMA_UPSTREAM": "http://127.0.0.1:11434/",
            "COMFYUI_UPSTREAM": "http://127.0.0.1:8188",
            "BROKER_OLLAMA_PORT": "6001",
            "BROKER_COMFYUI_PORT": " 6002 ",
            "BROKER_STATUS_PORT": "6100",
        }
    )
    assert cfg is not None
    assert cfg.source == "environment"
    assert cfg.status_port == 6100
    assert [(b.name, b.proxy_port, b.upstream, b.unload_strategy) for b in cfg.backends] == [
        ("ollama", 6001, "http://127.0.0.1:11434", "ollama"),
        ("comfyui", 6002, "http://127.0.0.1:8188", "comfyui"),
    ]


def test_quick_mode_defaults_and_absence() -> None:
    assert config_from_env({}) is None
    assert config_from_env({"BROKER_OLLAMA_PORT": "6001"}) is None
    cfg = config_from_env({"COMFYUI_UPSTREAM": "http://127.0.0.1:8188"})
    assert cfg is not None
    assert [(b.name, b.proxy_port) for b in cfg.backends] == [("comfyui", 5002)]
    assert cfg.status_port == DEFAULT_STATUS_PORT


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OLLAMA_UPSTREAM": "localhost:11434"},
         "$OLLAMA_UPSTREAM: expected an http:// or https:// URL with a host and no path, "
         "such as http://127.0.0.1:11434, found 'localhost:11434'"),
        ({"OLLAMA_UPSTREAM": "http://127.0.0.1:11434", "BROKER_OLLAMA_PORT": "abc"},
         "$BROKER_OLLAMA_PORT: expected a port number from 1 to 65535, found 'abc'"),
        ({"COMFYUI_UPSTREAM": "http://127.0.0.1:8188", "BROKER_STATUS_PORT": "0"},
         "$BROKER_STATUS_PORT: expected a port number from 1 to 65535, found '0'"),
        ({"OLLAMA_UPSTREAM": "http://127.0.0.1:11434", "BROKER_OLLAMA_PORT": "5102"},
         "$BROKER_OLLAMA_PORT: port 5102 is already $BROKER_STATUS_PORT; "
         "give ollama another port"),
        ({"OLLAMA_UPSTREAM": "http://127.0.0.1:1", "COMFYUI_UPSTREAM": "http://127.0.0.1:2",
          "BROKER_COMFYUI_PORT": "5001"},
         "$BROKER_COMFYUI_PORT: port 5001 is already $BROKER_OLLAMA_PORT; "
         "give comfyui another port"),
    ],
)  # fmt: skip
def test_quick_mode_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_env(env)
    assert str(info.value) == message


def test_resolve_prefers_explicit_then_env_var_then_usual_places(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = clean_env / "xdg" / "gpubroker" / "gpubroker.yaml"
    xdg.parent.mkdir(parents=True)
    xdg.write_text("statusPort: 7001\n")
    assert resolve_config(None).status_port == 7001

    write(clean_env, "statusPort: 7002\n", "onegpu4all.yaml")
    assert resolve_config(None).status_port == 7002
    write(clean_env, "statusPort: 7003\n", "gpubroker.yaml")
    assert resolve_config(None).status_port == 7003

    other = write(clean_env, "statusPort: 7004\n", "other.yaml")
    monkeypatch.setenv("GPUBROKER_CONFIG", str(other))
    assert resolve_config(None).status_port == 7004
    explicit = write(clean_env, "statusPort: 7005\n", "explicit.yaml")
    assert resolve_config(explicit).status_port == 7005


def test_resolve_falls_back_to_quick_mode(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"no config found .*gpubroker init"):
        resolve_config(None)
    monkeypatch.setenv("OLLAMA_UPSTREAM", "http://127.0.0.1:11434")
    cfg = resolve_config(None)
    assert cfg.source == "environment"
    assert cfg.backends[0].name == "ollama"
    # An explicit env mapping wins over os.environ.
    with pytest.raises(ConfigError, match="no config found"):
        resolve_config(None, env={"XDG_CONFIG_HOME": str(clean_env / "xdg")})


def test_default_config_paths(clean_env: Path) -> None:
    paths = default_config_paths({"XDG_CONFIG_HOME": "/xdg"})
    assert paths == [
        clean_env / "gpubroker.yaml",
        clean_env / "onegpu4all.yaml",
        Path("/xdg/gpubroker/gpubroker.yaml"),
    ]


def test_upstream_with_a_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gpubroker.yaml"
    path.write_text(
        "backends:\n  - name: a\n    proxyPort: 5001\n    upstream: http://127.0.0.1:8000/v1\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert "backends[0].upstream" in str(err.value) and "no path" in str(err.value)


def test_resolved_config_loads_back_as_the_same_config() -> None:
    import dataclasses

    from example_configs import CONFIGS, EXAMPLE_ENV
    from gpubroker.config.load import parse_config

    for path in CONFIGS:
        cfg = load_config_file(path, env=EXAMPLE_ENV)
        again = parse_config(cfg.to_dict(), source="again", env=EXAMPLE_ENV)
        assert dataclasses.replace(again, source=cfg.source) == cfg, path.name
