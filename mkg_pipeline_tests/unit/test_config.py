"""Configuration: seed defaults, YAML file, MKG_* env overrides, bounds and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from mkg_pipeline.config import (
    DEFAULT_CONFIG_FILE,
    CircuitBreakerConfig,
    ConfigError,
    HTTPClientConfig,
    PipelineConfig,
    VLLMServerConfig,
    get_settings,
    load_config,
    with_overrides,
)

SECRET = "sk-config-test-secret-42"


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mineru.yaml"
    path.write_text(text)
    return path


def assert_seed_values(cfg: PipelineConfig) -> None:
    assert cfg.http_client.keepalive == 5
    assert cfg.http_client.timeout_s == 300
    assert cfg.http_client.max_attempts == 3
    assert cfg.circuit_breaker.failure_threshold == 5
    assert cfg.circuit_breaker.recovery_timeout_s == 60
    assert cfg.circuit_breaker.success_threshold == 2
    assert cfg.workers.batch_size == 50
    assert cfg.workers.timeout_s == 600
    assert cfg.vllm.api_key is None


# -- defaults ----------------------------------------------------------------------------------


def test_code_defaults_are_the_seed_values() -> None:
    assert_seed_values(PipelineConfig())


def test_section_defaults_standalone() -> None:
    assert HTTPClientConfig().keepalive == 5
    assert CircuitBreakerConfig().half_open_max_calls >= 1
    assert VLLMServerConfig().url.startswith("http")


def test_repo_config_file_matches_the_seed_values() -> None:
    assert DEFAULT_CONFIG_FILE.exists()
    assert_seed_values(load_config(environ={}))


def test_missing_default_file_falls_back_to_code_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Containers may run from env only: no file at the default location is not an error.
    monkeypatch.setattr("mkg_pipeline.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.yaml")
    assert_seed_values(load_config(environ={}))


# -- YAML --------------------------------------------------------------------------------------


def test_yaml_file_is_loaded(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "engine: mineru\nvllm:\n  url: http://gpu:8000/\n  model: opendatalab/MinerU2.5\n"
        "http_client:\n  timeout_s: 120\n  max_attempts: 5\ncircuit_breaker:\n  failure_threshold: 9\n",
    )
    cfg = load_config(path, environ={})
    assert cfg.engine == "mineru"
    assert cfg.vllm.url == "http://gpu:8000"  # trailing slash stripped
    assert cfg.vllm.model == "opendatalab/MinerU2.5"
    assert cfg.http_client.timeout_s == 120
    assert cfg.http_client.max_attempts == 5
    assert cfg.circuit_breaker.failure_threshold == 9
    assert cfg.http_client.keepalive == 5  # untouched fields keep their defaults


def test_config_file_env_variable_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "http_client:\n  keepalive: 33\n")
    assert load_config(environ={"MKG_CONFIG_FILE": str(path)}).http_client.keepalive == 33


def test_explicit_path_wins_over_config_file_env(tmp_path: Path) -> None:
    chosen = write_yaml(tmp_path, "http_client:\n  keepalive: 21\n")
    other = tmp_path / "other.yaml"
    other.write_text("http_client:\n  keepalive: 99\n")
    assert load_config(chosen, environ={"MKG_CONFIG_FILE": str(other)}).http_client.keepalive == 21


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    assert_seed_values(load_config(write_yaml(tmp_path, ""), environ={}))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("vllm: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "mapping at the top level")],
    ids=["invalid-yaml", "not-a-mapping"],
)
def test_bad_yaml_is_a_config_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(missing, environ={})
    assert str(missing) in str(info.value)


def test_missing_file_named_by_env_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(environ={"MKG_CONFIG_FILE": str(tmp_path / "nope.yaml")})


# -- env overrides -----------------------------------------------------------------------------


def test_env_override_wins_over_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "vllm:\n  url: http://from-yaml:8000\nhttp_client:\n  timeout_s: 100\n")
    cfg = load_config(path, environ={"MKG_HTTP_CLIENT__TIMEOUT_S": "120", "MKG_VLLM__URL": "http://from-env:9000"})
    assert cfg.http_client.timeout_s == 120
    assert cfg.vllm.url == "http://from-env:9000"


def test_env_override_of_top_level_and_list_fields() -> None:
    cfg = load_config(environ={"MKG_ENGINE": "mineru", "MKG_QUALITY__GOLDEN_SET": "a.pdf, b.pdf,"})
    assert cfg.engine == "mineru"
    assert cfg.quality.golden_set == ["a.pdf", "b.pdf"]


def test_unrelated_env_variables_are_ignored() -> None:
    cfg = load_config(environ={"HOME": "/root", "VLLM_URL": "http://elsewhere", "PATH": "/bin"})
    assert cfg.vllm.url == "http://127.0.0.1:8000"


# -- bounds and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "dotted", "shown", "allowed"),
    [
        ("MKG_HTTP_CLIENT__MAX_ATTEMPTS", "http_client.max_attempts", "'0'", ">= 1 and <= 10"),
        ("MKG_HTTP_CLIENT__TIMEOUT_S", "http_client.timeout_s", "'99999'", ">= 1 and <= 3600"),
        ("MKG_CIRCUIT_BREAKER__FAILURE_THRESHOLD", "circuit_breaker.failure_threshold", "'0'", ">= 1 and <= 1000"),
        ("MKG_VLLM__MAX_IN_FLIGHT", "vllm.max_in_flight", "'5000'", ">= 1 and <= 4096"),
        ("MKG_PDF__DPI", "pdf.dpi", "'10'", ">= 36 and <= 600"),
    ],
)
def test_out_of_range_env_value_names_field_value_and_range(env: str, dotted: str, shown: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={env: shown.strip("'")})
    message = str(info.value)
    assert f"{dotted} = {shown}" in message
    assert f"allowed: {allowed}" in message
    assert f"from env {env}" in message


def test_out_of_range_yaml_value_names_field_value_and_range(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "circuit_breaker:\n  failure_threshold: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert f"circuit_breaker.failure_threshold = 0 (from {path})" in message
    assert "allowed: >= 1 and <= 1000" in message


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"MKG_HTTP_CLIENT__MAX_ATTEMPTS": "0", "MKG_HTTP_CLIENT__KEEPALIVE": "-1"})
    assert "http_client.max_attempts" in str(info.value)
    assert "http_client.keepalive" in str(info.value)


def test_non_http_url_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"vllm\.url = 'ftp://gpu'.*http:// or https://"):
        load_config(environ={"MKG_VLLM__URL": "ftp://gpu"})


def test_unknown_env_field_is_an_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="Extra inputs are not permitted") as info:
        load_config(environ={"MKG_HTTP_CLIENT__POOL_SIZ": "3"})
    assert "http_client.pool_siz" in str(info.value)
    assert "MKG_HTTP_CLIENT__POOL_SIZ" in str(info.value)


def test_unknown_env_field_names_the_closest_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"MKG_VLLM__URLL": "http://gpu:8000"})
    assert "vllm.urll = 'http://gpu:8000' (from env MKG_VLLM__URLL)" in str(info.value)
    assert "did you mean vllm.url?" in str(info.value)


def test_variables_that_name_no_section_are_ignored() -> None:
    # Not MKG_<known section>__<field> nor a top-level field: not configuration (issue 11).
    cfg = load_config(environ={"MKG_NOSUCHSECTION__FIELD": "1", "MKG_VLLM_URL": "http://elsewhere:1"})
    assert cfg.vllm.url == "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    "name",
    [
        "MKG_CODE_LOCATION_SERVICE_HOST",
        "MKG_CODE_LOCATION_SERVICE_PORT",
        "MKG_CODE_LOCATION_SERVICE_PORT_GRPC",
        "MKG_CODE_LOCATION_PORT",
        "MKG_CODE_LOCATION_PORT_3030_TCP",
        "MKG_CODE_LOCATION_PORT_3030_TCP_ADDR",
        "MKG_CODE_LOCATION_PORT_3030_TCP_PORT",
        "MKG_CODE_LOCATION_PORT_3030_TCP_PROTO",
        "MKG_PUSHGATEWAY_URL",
        "MKG_CORPUS_DIR",
    ],
)
def test_kubernetes_service_links_and_non_config_variables_are_ignored(name: str) -> None:
    assert load_config(environ={name: "10.96.0.12", "MKG_VLLM__URL": "http://vllm:8000"}).vllm.url == "http://vllm:8000"


def test_unknown_yaml_section_is_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "vllmm:\n  api_key: sk-in-yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert f"vllmm = {{api_key: ...}} (from {path})" in message
    assert "did you mean vllm?" in message
    assert "sk-in-yaml" not in message


def test_section_as_json_that_is_not_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match='field "vllm"'):
        load_config(environ={"MKG_VLLM": "{not json"})


def test_unknown_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "http_client:\n  pool_sise: 3\n")
    with pytest.raises(ConfigError, match=r"http_client\.pool_sise"):
        load_config(path, environ={})


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# -- secrets -----------------------------------------------------------------------------------


def test_api_key_is_a_secret_not_shown_in_repr() -> None:
    cfg = load_config(environ={"MKG_VLLM__API_KEY": SECRET})
    assert isinstance(cfg.vllm.api_key, SecretStr)
    assert cfg.vllm.api_key.get_secret_value() == SECRET
    for text in (repr(cfg), str(cfg), repr(cfg.vllm), cfg.model_dump_json()):
        assert SECRET not in text


def test_empty_api_key_means_none() -> None:
    assert load_config(environ={"MKG_VLLM__API_KEY": ""}).vllm.api_key is None


def test_secret_not_echoed_in_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"MKG_VLLM__API_KEY": SECRET, "MKG_VLLM__API_KEY_TYPO": SECRET})
    assert SECRET not in str(info.value)
    assert "vllm.api_key_typo = <secret>" in str(info.value)


def test_secret_in_a_whole_section_variable_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"MKG_VLLM": f'{{"url": "ftp://gpu", "api_kee": "{SECRET}"}}'})
    assert SECRET not in str(info.value)
    assert "vllm.api_kee = <secret> (from env MKG_VLLM)" in str(info.value)


def test_non_config_mkg_variables_are_not_read_as_fields() -> None:
    environ = {"MKG_CORPUS_DIR": "/data/corpus", "MKG_PUSHGATEWAY_URL": "http://pgw:9091"}
    assert load_config(environ=environ).vllm.max_in_flight == 256


# -- one settings object per process, resource overrides -------------------------------------------


def test_get_settings_loads_once_until_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MKG_PDF__DPI", "120")
    get_settings.cache_clear()
    first = get_settings()
    assert first.pdf.dpi == 120
    monkeypatch.setenv("MKG_PDF__DPI", "200")
    assert get_settings() is first  # the process's settings do not drift under it
    get_settings.cache_clear()
    assert get_settings().pdf.dpi == 200
    get_settings.cache_clear()


def test_settings_are_frozen() -> None:
    cfg = load_config(environ={})
    with pytest.raises(ValueError, match="frozen"):
        cfg.vllm.url = "http://elsewhere:1"  # type: ignore[misc]


def test_overrides_replace_fields_and_keep_the_rest() -> None:
    cfg = load_config(environ={"MKG_VLLM__API_KEY": SECRET, "MKG_PDF__DPI": "100"})
    out = with_overrides(cfg, {"vllm.url": "http://gpu:9/", "vllm.model": None, "engine": "mineru"}, "resource vllm")
    assert (out.vllm.url, out.engine) == ("http://gpu:9", "mineru")
    assert out.vllm.model == cfg.vllm.model and out.pdf.dpi == 100
    assert out.vllm.api_key is not None and out.vllm.api_key.get_secret_value() == SECRET
    assert with_overrides(cfg, {"vllm.url": None}, "resource vllm") is cfg


def test_overrides_get_the_same_bounds_and_messages() -> None:
    cfg = load_config(environ={})
    with pytest.raises(ConfigError) as info:
        with_overrides(cfg, {"vllm.url": "ftp://gpu", "storage.bucket": "ab", "vllm.api_key": SECRET}, "resource s3")
    message = str(info.value)
    assert "vllm.url = 'ftp://gpu' (from resource s3)" in message
    assert "storage.bucket = 'ab' (from resource s3)" in message and "allowed: length >= 3 and length <= 63" in message
    assert SECRET not in message


def test_routing_is_on_by_default_and_set_per_document_from_the_environment() -> None:
    assert load_config(environ={}).routing.mode == "auto"
    cfg = load_config(environ={"MKG_ROUTING__MODE": "vlm", "MKG_ROUTING__OVERRIDES": '{"aaaaaaaaaaaaaaaa": "text"}'})
    assert (cfg.routing.mode_for("aaaaaaaaaaaaaaaa"), cfg.routing.mode_for("bbbbbbbbbbbbbbbb")) == ("text", "vlm")
    with pytest.raises(ConfigError, match=r"routing\.mode"):
        load_config(environ={"MKG_ROUTING__MODE": "gpu"})


def test_page_images_are_sized_per_engine() -> None:
    images = load_config(environ={}).page_images
    assert (images.for_engine("page_markdown").max_pixels, images.for_engine("olmocr").longest_side_px) == (
        1280 * 28 * 28,
        1288,
    )
    cfg = load_config(environ={"MKG_PAGE_IMAGES__OLMOCR__LONGEST_SIDE_PX": "1024"})
    assert cfg.page_images.olmocr.longest_side_px == 1024
