"""Tests for clproxy.config: loading, interpolation, validation and secrecy of the configuration file."""

import os
import textwrap

import attr
import pytest

from clproxy.config import (
    AccountConfig,
    Config,
    ConfigError,
    FallbackTarget,
    LoadedConfig,
    ModelMapping,
    ServerConfig,
    clproxy_home,
    default_config_path,
    load_config,
    load_env_file,
    parse_config,
)

SEED_EXAMPLE = """\
# ~/.neurolink/proxy-config.yaml
version: 1

# Account definitions (alternative to neurolink auth login)
accounts:
  anthropic:
    - name: primary
      apiKey: ${ANTHROPIC_API_KEY_PRIMARY}
    - name: secondary
      apiKey: ${ANTHROPIC_API_KEY_SECONDARY}
      weight: 2
      rateLimit: 100

# Routing configuration
routing:
  strategy: fill-first # or round-robin

  # Model mappings: remap incoming model names to different providers
  model-mappings:
    - from: claude-sonnet-4-20250514
      to: gemini-2.5-pro
      provider: google-ai

  # Fallback chain: try these when all Claude accounts are exhausted
  fallback-chain:
    - provider: google-ai
      model: gemini-2.5-flash
    - provider: openai
      model: gpt-4o

  # Models that always go to Anthropic (skip routing logic)
  passthrough-models:
    - claude-opus-4-20250514
    - claude-sonnet-4-5-20250929

# Cloaking configuration (request transformation for OAuth)
cloaking:
  mode: auto # "auto" | "always" | "never"
  plugins: {}
"""

SEED_ENV = {"ANTHROPIC_API_KEY_PRIMARY": "sk-ant-primary", "ANTHROPIC_API_KEY_SECONDARY": "sk-ant-second"}

PLANTED = "sk-ant-PLANTED-7f3a9c1e-DO-NOT-LEAK"

EXAMPLE_FILE = os.path.join(os.path.dirname(__file__), os.pardir, "etc", "proxy-config.example.yaml")


def parse(text, environ=None):
    """Parse dedented YAML ``text`` with an environment that holds only ``environ``."""
    return parse_config(textwrap.dedent(text), "test.yaml", environ or {})


def parse_error(text, environ=None):
    """The ConfigError that parsing ``text`` raises."""
    with pytest.raises(ConfigError) as info:
        parse(text, environ)
    return info.value


def account_yaml(body):
    """A config with one valid account followed by an account whose fields are ``body``."""
    return "accounts:\n  anthropic:\n    - name: first\n      apiKey: ${K}\n    - " + \
        textwrap.indent(textwrap.dedent(body), "      ").lstrip()


# --- the seed's example and the shipped example -----------------------------------------------------


def test_seed_neurolink_example_loads_unchanged():
    """The NeuroLink proxy-config.yaml from the seed loads as written, with the values it states."""
    loaded = parse_config(SEED_EXAMPLE, "seed.yaml", SEED_ENV)
    config = loaded.config
    assert loaded.warnings == ()
    assert config.version == 1
    assert [(a.name, a.api_key, a.weight, a.rate_limit, a.enabled) for a in config.accounts] == [
        ("primary", "sk-ant-primary", 1, None, True),
        ("secondary", "sk-ant-second", 2, 100, True),
    ]
    assert config.routing.strategy == "fill-first"
    assert config.routing.model_mappings == (
        ModelMapping(from_model="claude-sonnet-4-20250514", to_model="gemini-2.5-pro", provider="google-ai"),)
    assert config.routing.fallback_chain == (
        FallbackTarget(provider="google-ai", model="gemini-2.5-flash"),
        FallbackTarget(provider="openai", model="gpt-4o"))
    assert config.routing.passthrough_models == ("claude-opus-4-20250514", "claude-sonnet-4-5-20250929")
    assert config.cloaking.mode == "auto"
    assert dict(config.cloaking.plugins) == {}


def test_seed_interpolation_example_uses_the_default_key():
    """The seed's ``${ANTHROPIC_KEY_2:-sk-ant-fallback-key}`` falls back to its default when unset."""
    loaded = parse("""\
        accounts:
          anthropic:
            - name: primary
              apiKey: ${ANTHROPIC_KEY_1}
            - name: fallback
              apiKey: ${ANTHROPIC_KEY_2:-sk-ant-fallback-key}
        """, {"ANTHROPIC_KEY_1": "sk-one"})
    assert [a.api_key for a in loaded.config.accounts] == ["sk-one", "sk-ant-fallback-key"]
    assert loaded.warnings == ()


def test_shipped_example_file_loads_without_errors():
    """etc/proxy-config.example.yaml is a valid config whose only warning is the unset secondary key."""
    loaded = load_config(EXAMPLE_FILE, {"ANTHROPIC_API_KEY_PRIMARY": "sk-example", "HOME": "/nonexistent"})
    assert loaded.config.accounts[0].api_key == "sk-example"
    assert loaded.config.accounts[1].enabled is False
    assert loaded.warnings == ('accounts.anthropic[1]: account "secondary" disabled because its apiKey is empty',)
    assert loaded.config.server == ServerConfig()
    # copied as it is, it routes like no file: its examples that would change that are comments
    routing = loaded.config.routing
    assert (routing.model_mappings, routing.fallback_chain, routing.passthrough_models) == ((), (), ())
    primary = loaded.config.accounts[0]
    assert (primary.excluded_models, primary.max_concurrent, primary.rate_limit) == ((), None, None)


def test_shipped_example_file_mentions_every_field():
    """Every field of every config class appears (camelCased) in the example file."""
    with open(EXAMPLE_FILE, encoding="utf-8") as f:
        text = f.read()
    import clproxy.config as module
    from clproxy.config import schema
    camel = {"model_mappings": "model-mappings", "fallback_chain": "fallback-chain",
             "passthrough_models": "passthrough-models", "google_ai": "google-ai",
             "from_model": "from", "to_model": "to", "session_affinity": "session-affinity",
             "queue_timeout": "queue-timeout", "switch_at": "switch-at"}
    missing = []
    for cls in (module.Config, module.AccountConfig, module.ModelMapping, module.FallbackTarget,
                module.RoutingConfig, module.CloakingConfig, module.AnthropicProvider,
                module.OpenAIProvider, module.GoogleProvider, module.ProvidersConfig, module.ServerConfig,
                module.StateConfig, module.LoggingConfig, schema.SessionAffinityConfig,
                schema.QuotaRoutingConfig):
        for field in attr.fields(cls):
            head, *rest = field.name.split("_")
            spelled = camel.get(field.name, head + "".join(p.capitalize() for p in rest))
            if f"{spelled}:" not in text:
                missing.append(f"{cls.__name__}.{field.name}")
    assert missing == []


# --- formats and files ------------------------------------------------------------------------------


def test_json_file_loads(tmp_path):
    """A file starting with ``{`` is read as JSON, with the same keys and interpolation as YAML."""
    path = tmp_path / "proxy-config.json"
    path.write_text('{"version": 1, "accounts": {"anthropic": [{"name": "j", "apiKey": "${K}", "weight": 3}]},'
                    ' "routing": {"strategy": "round-robin", "passthrough-models": ["m1"]}}')
    loaded = load_config(str(path), {"K": "sk-json"})
    assert loaded.config.accounts == (AccountConfig(name="j", api_key="sk-json", weight=3),)
    assert loaded.config.routing.strategy == "round-robin"
    assert loaded.config.routing.passthrough_models == ("m1",)
    assert loaded.source == str(path)


def test_json_syntax_error_names_file_and_line(tmp_path):
    """Broken JSON (that is not YAML either) is reported as ``<file>:<line>`` with the parser's reason."""
    path = tmp_path / "c.json"
    path.write_text('{\n  "version": 1,\n  "routing": {"strategy": "x",, }\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert info.value.path == f"{path}:3"
    assert info.value.problem.startswith("invalid JSON: ")


def test_yaml_flow_mapping_starting_with_brace_is_accepted_with_a_warning():
    """A YAML flow mapping (starts with ``{`` but is not JSON) loads as YAML, with a warning naming the line."""
    loaded = parse_config("{routing: {strategy: round-robin}}", "flow.yaml", {})
    assert loaded.config.routing.strategy == "round-robin"
    assert len(loaded.warnings) == 1
    assert loaded.warnings[0].startswith("flow.yaml:1: not valid JSON (")
    assert loaded.warnings[0].endswith("read as YAML instead")


def test_yaml_syntax_error_names_the_line(tmp_path):
    """A YAML syntax error gives ``<file>:<line>`` pointing at the offending line."""
    path = tmp_path / "proxy-config.yaml"
    path.write_text("version: 1\nrouting:\n  strategy: fill-first\n  bad: [unclosed\ncloaking: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert info.value.path.startswith(f"{path}:")
    line = int(info.value.path.rsplit(":", 1)[1])
    assert line in (4, 5)
    assert info.value.problem.startswith("invalid YAML: ")
    assert str(info.value).startswith(f"{path}:{line}: invalid YAML: ")


def test_yaml_tab_indentation_error_names_line_3(tmp_path):
    """A tab used for indentation on line 3 is reported at line 3."""
    path = tmp_path / "proxy-config.yaml"
    path.write_text("version: 1\nrouting:\n\tstrategy: fill-first\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert info.value.path == f"{path}:3"


def test_yaml_duplicate_key_is_an_error_with_its_line():
    """A key given twice in one YAML mapping is an error at the second occurrence, not a silent override."""
    with pytest.raises(ConfigError) as info:
        parse_config("routing:\n  strategy: fill-first\n  strategy: round-robin\n", "dup.yaml", {})
    assert info.value.path == "dup.yaml:3"
    assert 'duplicate key "strategy"' in info.value.problem


def test_yaml_merge_keys_may_be_overridden():
    """YAML merge keys (``<<``) with an overriding key are not mistaken for duplicates."""
    loaded = parse("""\
        x-base: &base {to: gemini-2.5-pro, provider: google-ai}
        routing:
          model-mappings:
            - <<: *base
              from: a
              to: gemini-2.5-flash
        """)
    assert loaded.config.routing.model_mappings == (
        ModelMapping(from_model="a", to_model="gemini-2.5-flash", provider="google-ai"),)


def test_json_duplicate_key_is_an_error():
    """A key given twice in one JSON object is an error."""
    with pytest.raises(ConfigError) as info:
        parse_config('{"version": 1, "version": 1}', "dup.json", {})
    assert info.value.path == "dup.json"
    assert 'duplicate key "version"' in info.value.problem


def test_explicit_missing_path_is_an_error(tmp_path):
    """A config path given explicitly that does not exist raises ``config file not found``."""
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(missing, {"CLPROXY_HOME": str(tmp_path / "home")})
    assert info.value.path == ""
    assert str(info.value) == f"config file not found: {missing}"


def test_missing_file_at_default_location_gives_defaults_and_a_note(tmp_path):
    """No path and no file at ``$CLPROXY_HOME/proxy-config.yaml``: default config and a note naming that path."""
    home = str(tmp_path / "home")
    loaded = load_config(None, {"CLPROXY_HOME": home})
    assert loaded.config == Config()
    assert loaded.source is None
    assert loaded.warnings == ()
    assert len(loaded.notes) == 1
    assert "no config file found" in loaded.notes[0]
    assert os.path.join(home, "proxy-config.yaml") in loaded.notes[0]


def test_default_path_given_explicitly_and_missing_gives_defaults(tmp_path):
    """Naming the default location explicitly behaves like naming nothing when the file is missing."""
    environ = {"CLPROXY_HOME": str(tmp_path)}
    loaded = load_config(default_config_path(environ), environ)
    assert loaded.config == Config()
    assert loaded.notes and loaded.source is None


def test_file_at_default_location_is_loaded(tmp_path):
    """With no path, an existing ``$CLPROXY_HOME/proxy-config.yaml`` is read."""
    (tmp_path / "proxy-config.yaml").write_text("cloaking:\n  mode: never\n")
    loaded = load_config(None, {"CLPROXY_HOME": str(tmp_path)})
    assert loaded.config.cloaking.mode == "never"
    assert loaded.source == str(tmp_path / "proxy-config.yaml")
    assert loaded.notes == ()


def test_unreadable_config_path_names_the_file(tmp_path):
    """A path that cannot be read (here a directory) is a ConfigError naming that path."""
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), {})
    assert info.value.path == str(tmp_path)
    assert info.value.problem.startswith("cannot read config file")


def test_non_utf8_file_is_an_error(tmp_path):
    """A config file that is not UTF-8 is a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "c.yaml"
    path.write_bytes(b"version: 1\nname: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(str(path), {})


def test_clproxy_home_and_default_path():
    """CLPROXY_HOME sets the home; unset or empty it is ~/.clproxy under the environ's HOME."""
    assert clproxy_home({"CLPROXY_HOME": "/srv/clp"}) == "/srv/clp"
    assert clproxy_home({"HOME": "/home/u"}) == os.path.join("/home/u", ".clproxy")
    assert clproxy_home({"CLPROXY_HOME": "", "HOME": "/home/u"}) == os.path.join("/home/u", ".clproxy")
    assert clproxy_home({"CLPROXY_HOME": "~/x", "HOME": "/home/u"}) == "/home/u/x"
    assert default_config_path({"CLPROXY_HOME": "/srv/clp"}) == os.path.join("/srv/clp", "proxy-config.yaml")


# --- defaults and shape -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "{}"])
def test_empty_file_gives_defaults(text):
    """An empty (or comment-only, or ``{}``) file gives the default configuration, without warnings."""
    loaded = parse_config(text, "empty.yaml", {})
    assert loaded == LoadedConfig(config=Config(), source="empty.yaml")


def test_defaults_have_the_documented_values():
    """The defaults are the documented ones (spot check of each section)."""
    config = parse("").config
    assert config.version == 1 and config.accounts == ()
    assert config.routing.strategy == "fill-first"
    assert config.routing.session_affinity.enabled is True and config.routing.session_affinity.ttl == 3600.0
    assert config.routing.quota.switch_at == 0.9 and config.routing.queue_timeout == 30.0
    assert config.cloaking.mode == "auto"
    assert config.providers.anthropic.base_url == "https://api.anthropic.com"
    assert config.providers.anthropic.client_id == "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    assert config.providers.anthropic.refresh_before_expiry == 3600.0
    assert config.providers.openai.base_url == "https://api.openai.com/v1"
    assert config.providers.google_ai.base_url == "https://generativelanguage.googleapis.com"
    assert config.server.max_body_bytes == 32 * 1024 * 1024
    assert (config.server.upstream_timeout, config.server.request_deadline) == (600.0, 900.0)
    assert config.state.backend == "memory" and config.state.prefix == "clproxy"
    assert config.logging.dir is None and config.logging.debug_bodies is False


def test_empty_sections_give_defaults():
    """A section present but empty (null) gives that section's defaults."""
    loaded = parse("routing:\ncloaking:\nserver:\naccounts:\n  anthropic:\n")
    assert loaded.config == Config()


def test_provider_keys_default_from_environment():
    """OpenAI's key defaults to $OPENAI_API_KEY; Gemini's to $GEMINI_API_KEY, else $GOOGLE_API_KEY."""
    config = parse("", {"OPENAI_API_KEY": "sk-o", "GOOGLE_API_KEY": "g-2"}).config
    assert config.providers.openai.api_key == "sk-o"
    assert config.providers.google_ai.api_key == "g-2"
    config = parse("", {"GEMINI_API_KEY": "g-1", "GOOGLE_API_KEY": "g-2"}).config
    assert config.providers.google_ai.api_key == "g-1"
    assert config.providers.openai.api_key is None


def test_provider_key_in_file_wins_over_environment_default():
    """A provider apiKey given in the file is used instead of the environment default."""
    config = parse("providers:\n  openai:\n    apiKey: ${MY_OPENAI}\n",
                   {"MY_OPENAI": "sk-mine", "OPENAI_API_KEY": "sk-env"}).config
    assert config.providers.openai.api_key == "sk-mine"


def test_config_is_frozen_and_uses_tuples():
    """The loaded config cannot be mutated: attributes are frozen, sequences are tuples, metadata read-only."""
    config = parse("""\
        accounts:
          anthropic:
            - name: a
              apiKey: ${K}
              metadata: {tags: [x, y], nested: {k: v}}
        """, {"K": "sk"}).config
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        config.accounts[0].weight = 5
    assert isinstance(config.accounts, tuple)
    metadata = config.accounts[0].metadata
    assert metadata["tags"] == ("x", "y")
    with pytest.raises(TypeError):
        metadata["new"] = 1
    with pytest.raises(TypeError):
        metadata["nested"]["k"] = "w"
    hash(config)


def test_top_level_must_be_a_mapping():
    """A top level that is a list is a ConfigError with an empty path."""
    error = parse_error("- a\n- b\n")
    assert error.path == ""
    assert str(error) == "the top level of the config file must be a mapping, got a list"


@pytest.mark.parametrize("text, shown", [("version: 2", "2"), ("version: '1'", '"1"'), ("version: true", "true")])
def test_version_other_than_1_is_an_error(text, shown):
    """``version`` must be the number 1; anything else is an error at ``version`` showing the value."""
    error = parse_error(text)
    assert error.path == "version"
    assert f"unsupported version {shown}" in error.problem


def test_version_1_and_missing_version_are_accepted():
    """``version: 1`` and no version both load as version 1."""
    assert parse("version: 1").config.version == 1
    assert parse("routing: {}").config.version == 1


# --- validation errors ------------------------------------------------------------------------------


def test_error_message_format():
    """``str(ConfigError)`` is ``path: problem``, or only the problem when the path is empty."""
    assert str(ConfigError("a.b", "bad")) == "a.b: bad"
    assert str(ConfigError("", "bad")) == "bad"
    error = ConfigError("x[0]", "worse")
    assert (error.path, error.problem) == ("x[0]", "worse")


def test_weight_error_matches_documented_example():
    """A non-numeric weight gives exactly ``accounts.anthropic[1].weight: must be a positive number, got "two"``."""
    error = parse_error(account_yaml("name: b\napiKey: ${K}\nweight: two\n"), {"K": "sk"})
    assert str(error) == 'accounts.anthropic[1].weight: must be a positive number, got "two"'


ACCOUNT_ERRORS = [
    ("weight: 0", "accounts.anthropic[1].weight", "must be a positive number, got 0"),
    ("weight: -1.5", "accounts.anthropic[1].weight", "must be a positive number, got -1.5"),
    ("weight: true", "accounts.anthropic[1].weight", "must be a positive number, got true"),
    ("weight: .nan", "accounts.anthropic[1].weight", "must be a positive number, got nan"),
    ("enabled: 'yes'", "accounts.anthropic[1].enabled", 'must be true or false, got "yes"'),
    ("enabled: 1", "accounts.anthropic[1].enabled", "must be true or false, got 1"),
    ("rateLimit: 1.5", "accounts.anthropic[1].rateLimit", "must be a positive integer, got 1.5"),
    ("rateLimit: 0", "accounts.anthropic[1].rateLimit", "must be a positive integer, got 0"),
    ("rateLimit: true", "accounts.anthropic[1].rateLimit", "must be a positive integer, got true"),
    ("baseUrl: ftp://example.com", "accounts.anthropic[1].baseUrl",
     'must be a http:// or https:// URL, got "ftp://example.com"'),
    ("baseUrl: api.anthropic.com", "accounts.anthropic[1].baseUrl",
     'must be a http:// or https:// URL, got "api.anthropic.com"'),
    ("orgId: 42", "accounts.anthropic[1].orgId", "must be a string, got 42"),
    ("metadata: [a]", "accounts.anthropic[1].metadata", "must be a mapping, got a list"),
    ("name: [a]", "accounts.anthropic[1].name", "must be a string, got a list"),
]


@pytest.mark.parametrize("line, path, problem", ACCOUNT_ERRORS)
def test_account_field_errors(line, path, problem):
    """Each invalid account field is reported at its own path with the offending value."""
    body = "name: b\napiKey: ${K}\n" + line + "\n" if not line.startswith("name:") else line + "\napiKey: ${K}\n"
    error = parse_error(account_yaml(body), {"K": "sk"})
    assert (error.path, error.problem) == (path, problem)


def test_duplicate_account_name():
    """A repeated account name is an error at the repeat's ``name``."""
    error = parse_error("""\
        accounts:
          anthropic:
            - {name: x, apiKey: "${K}"}
            - {name: y, apiKey: "${K}"}
            - {name: x, apiKey: "${K}"}
        """, {"K": "sk"})
    assert error.path == "accounts.anthropic[2].name"
    assert error.problem.startswith('duplicate account name "x"')


def test_unnamed_accounts_get_index_names():
    """Accounts without a name are called ``unnamed-<index>``."""
    config = parse("accounts:\n  anthropic:\n    - apiKey: ${K}\n    - apiKey: ${K}\n", {"K": "s"}).config
    assert [a.name for a in config.accounts] == ["unnamed-0", "unnamed-1"]


def test_enabled_account_without_api_key_is_an_error():
    """An enabled account with no apiKey is an error at its apiKey path."""
    error = parse_error(account_yaml("name: b\nweight: 2\n"), {"K": "sk"})
    assert error.path == "accounts.anthropic[1].apiKey"
    assert "required" in error.problem


def test_disabled_account_without_api_key_is_accepted():
    """An account with ``enabled: false`` needs no apiKey."""
    config = parse(account_yaml("name: b\nenabled: false\n"), {"K": "sk"}).config
    assert config.accounts[1] == AccountConfig(name="b", enabled=False)


def test_account_whose_key_variable_is_unset_is_disabled_with_warnings():
    """An apiKey that interpolates to empty disables the account and warns, rather than failing the load."""
    loaded = parse(account_yaml("name: b\napiKey: ${MISSING_KEY}\n"), {"K": "sk"})
    assert loaded.config.accounts[1].enabled is False
    assert loaded.config.accounts[1].api_key is None
    assert loaded.warnings == (
        "accounts.anthropic[1].apiKey: environment variable MISSING_KEY is not set",
        'accounts.anthropic[1]: account "b" disabled because its apiKey is empty',
    )


def test_weight_integral_float_becomes_int_and_fraction_stays_float():
    """``weight: 2.0`` is stored as ``2``; ``weight: 1.5`` as ``1.5``."""
    config = parse(account_yaml("name: b\napiKey: ${K}\nweight: 2.0\n"), {"K": "s"}).config
    assert config.accounts[1].weight == 2 and isinstance(config.accounts[1].weight, int)
    config = parse(account_yaml("name: b\napiKey: ${K}\nweight: 1.5\n"), {"K": "s"}).config
    assert config.accounts[1].weight == 1.5 and isinstance(config.accounts[1].weight, float)


SECTION_ERRORS = [
    ("accounts: []", "accounts", "must be a mapping, got a list"),
    ("accounts:\n  anthropic: {name: a}", "accounts.anthropic", "must be a list, got a mapping"),
    ("accounts:\n  anthropic: [key]", "accounts.anthropic[0]", 'must be a mapping, got "key"'),
    ("routing: fill-first", "routing", 'must be a mapping, got "fill-first"'),
    ("routing:\n  session-affinity: sticky", "routing.session-affinity", 'must be a mapping, got "sticky"'),
    ("routing:\n  session-affinity:\n    enabled: 1", "routing.session-affinity.enabled",
     "must be true or false, got 1"),
    ("routing:\n  session-affinity:\n    ttl: 0", "routing.session-affinity.ttl",
     "must be a positive number of seconds, got 0"),
    ("routing:\n  session-affinity:\n    ttl: 1h", "routing.session-affinity.ttl",
     'must be a positive number of seconds, got "1h"'),
    ("routing:\n  quota:\n    switch-at: 0", "routing.quota.switch-at",
     "must be a number greater than 0 and at most 1 (a fraction of the window), got 0"),
    ("routing:\n  quota:\n    switch-at: 1.01", "routing.quota.switch-at",
     "must be a number greater than 0 and at most 1 (a fraction of the window), got 1.01"),
    ("routing:\n  quota:\n    switch-at: 90%", "routing.quota.switch-at",
     'must be a number greater than 0 and at most 1 (a fraction of the window), got "90%"'),
    ("routing:\n  quota: 0.9", "routing.quota", "must be a mapping, got 0.9"),
    ("routing:\n  queue-timeout: 0", "routing.queue-timeout", "must be a positive number of seconds, got 0"),
    ("routing:\n  queue-timeout: -5", "routing.queue-timeout", "must be a positive number of seconds, got -5"),
    ("routing:\n  strategy: random", "routing.strategy", 'must be one of "fill-first", "round-robin"'),
    ("routing:\n  model-mappings:\n    - {from: a, to: b, provider: mistral}",
     "routing.model-mappings[0].provider", 'unknown provider "mistral"; expected one of "anthropic", "openai", '
                                           '"google-ai"'),
    ("routing:\n  model-mappings:\n    - {to: b, provider: openai}", "routing.model-mappings[0].from",
     "is required"),
    ("routing:\n  model-mappings:\n    - {from: a, provider: openai}", "routing.model-mappings[0].to",
     "is required"),
    ("routing:\n  model-mappings:\n    - {from: a, to: b}", "routing.model-mappings[0].provider", "is required"),
    ("routing:\n  model-mappings:\n    - {from: a, to: b, provider: openai}\n    - {from: a, to: c, provider: openai}",
     "routing.model-mappings[1].from", 'duplicate mapping for "a"'),
    ("routing:\n  fallback-chain:\n    - {provider: openai, model: gpt-4o}\n    - {provider: cohere, model: x}",
     "routing.fallback-chain[1].provider", 'unknown provider "cohere"'),
    ("routing:\n  fallback-chain:\n    - {provider: openai}", "routing.fallback-chain[0].model", "is required"),
    ("routing:\n  fallback-chain:\n    - {provider: openai, model: ''}", "routing.fallback-chain[0].model",
     "must not be empty"),
    ("routing:\n  fallback-chain: gpt-4o", "routing.fallback-chain", 'must be a list, got "gpt-4o"'),
    ("routing:\n  passthrough-models: [a, 7]", "routing.passthrough-models[1]", "must be a string, got 7"),
    ("cloaking:\n  mode: sometimes", "cloaking.mode", 'must be one of "auto", "always", "never", got "sometimes"'),
    ("cloaking:\n  plugins: [a]", "cloaking.plugins", "must be a mapping, got a list"),
    ("providers:\n  anthropic:\n    oauthTokenUrl: /token", "providers.anthropic.oauthTokenUrl",
     'must be a http:// or https:// URL, got "/token"'),
    ("providers:\n  anthropic:\n    refreshBeforeExpiry: -5", "providers.anthropic.refreshBeforeExpiry",
     "must be a non-negative number of seconds, got -5"),
    ("providers:\n  anthropic:\n    scopes: [a, {b: c}]", "providers.anthropic.scopes[1]",
     "must be a string, got a mapping"),
    ("providers:\n  openai:\n    baseUrl: localhost:8080", "providers.openai.baseUrl",
     'must be a http:// or https:// URL, got "localhost:8080"'),
    ("providers:\n  google-ai: []", "providers.google-ai", "must be a mapping, got a list"),
    ("server:\n  maxBodyBytes: 0", "server.maxBodyBytes", "must be a positive integer, got 0"),
    ("server:\n  maxBodyBytes: 32MiB", "server.maxBodyBytes", 'must be a positive integer, got "32MiB"'),
    ("server:\n  upstreamTimeout: -1", "server.upstreamTimeout", "must be a positive number of seconds, got -1"),
    ("server:\n  connectTimeout: 0", "server.connectTimeout", "must be a positive number of seconds, got 0"),
    ("server:\n  requestDeadline: 10m", "server.requestDeadline",
     'must be a positive number of seconds, got "10m"'),
    ("server:\n  maxConnectionsPerHost: 2.5", "server.maxConnectionsPerHost",
     "must be a positive integer, got 2.5"),
    ("server:\n  drainTimeout: -0.1", "server.drainTimeout", "must be a non-negative number of seconds, got -0.1"),
    ("server:\n  keepaliveInterval: false", "server.keepaliveInterval",
     "must be a non-negative number of seconds, got false"),
    ("state:\n  backend: postgres", "state.backend", 'must be one of "memory", "redis", got "postgres"'),
    ("state:\n  url: http://localhost:6379", "state.url",
     'must be a redis:// or rediss:// or unix:// URL, got "http://localhost:6379"'),
    ("state:\n  prefix: ''", "state.prefix", "must not be empty"),
    ("logging:\n  retentionDays: -1", "logging.retentionDays", "must be a non-negative number, got -1"),
    ("logging:\n  maxTotalMb: lots", "logging.maxTotalMb", 'must be a non-negative number, got "lots"'),
    ("logging:\n  debugBodies: 'true'", "logging.debugBodies", 'must be true or false, got "true"'),
    ("logging:\n  dir: 5", "logging.dir", "must be a string, got 5"),
]


@pytest.mark.parametrize("text, path, problem", SECTION_ERRORS)
def test_section_errors(text, path, problem):
    """Each invalid value outside accounts is reported at its exact key path with the value shown."""
    error = parse_error(text + "\n")
    assert error.path == path
    assert error.problem.startswith(problem), error.problem


ROUTING_KEYS_YAML = """
routing:
  strategy: drain-soonest
  session-affinity:
    enabled: false
    ttl: 120
  quota:
    switch-at: 1
  queue-timeout: 2.5
"""


def test_routing_keys_as_the_issue_writes_them():
    """routing.session-affinity.{enabled,ttl}, routing.quota.switch-at and routing.queue-timeout are
    read into the frozen routing config, without unknown-key warnings."""
    loaded = parse(ROUTING_KEYS_YAML)
    routing = loaded.config.routing
    assert loaded.warnings == ()
    assert routing.strategy == "drain-soonest"
    assert (routing.session_affinity.enabled, routing.session_affinity.ttl) == (False, 120.0)
    assert routing.quota.switch_at == 1.0 and routing.queue_timeout == 2.5
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        routing.quota.switch_at = 0.5  # type: ignore[misc]


def test_routing_keys_accept_other_spellings_and_interpolation():
    """camelCase spellings and ${VAR} numbers work as for every other key; a typo warns."""
    loaded = parse("routing:\n  sessionAffinity: {ttl: '${TTL}'}\n  quota: {switchAt: 0.5, swichAt: 1}\n"
                   "  queueTimeout: 7\n", {"TTL": "90"})
    routing = loaded.config.routing
    assert routing.session_affinity.ttl == 90.0 and routing.session_affinity.enabled is True
    assert routing.quota.switch_at == 0.5 and routing.queue_timeout == 7.0
    assert any('unknown key "swichAt" at routing.quota' in w for w in loaded.warnings)


def test_zero_drain_and_keepalive_are_allowed():
    """Durations that may be zero (drain, keep-alive, refresh margin) accept 0."""
    config = parse("server: {drainTimeout: 0, keepaliveInterval: 0}\n"
                   "providers: {anthropic: {refreshBeforeExpiry: 0}}\n").config
    assert (config.server.drain_timeout, config.server.keepalive_interval) == (0.0, 0.0)
    assert config.providers.anthropic.refresh_before_expiry == 0.0


def test_error_source_is_recorded():
    """A validation error raised while parsing remembers which file it came from."""
    with pytest.raises(ConfigError) as info:
        parse_config("routing:\n  strategy: x\n", "/etc/clproxy.yaml", {})
    assert info.value.source == "/etc/clproxy.yaml"


# --- interpolation ----------------------------------------------------------------------------------


def test_interpolation_of_a_set_variable():
    """``${VAR}`` is replaced by the variable's value, also inside a longer string."""
    config = parse("state:\n  url: redis://${REDIS_HOST}:6379/${DB}\n", {"REDIS_HOST": "cache", "DB": "2"}).config
    assert config.state.url == "redis://cache:6379/2"


def test_interpolation_default_when_unset_or_empty():
    """``${VAR:-default}`` uses the default when VAR is unset or empty, and VAR otherwise."""
    text = "state:\n  prefix: ${P:-fallback}\n"
    assert parse(text, {}).config.state.prefix == "fallback"
    assert parse(text, {"P": ""}).config.state.prefix == "fallback"
    assert parse(text, {"P": "set"}).config.state.prefix == "set"


def test_interpolation_empty_default_gives_empty_string_without_warning():
    """``${VAR:-}`` with VAR unset gives an empty string and no warning."""
    loaded = parse("logging:\n  dir: /var/log/clp${SUFFIX:-}\n")
    assert loaded.config.logging.dir == "/var/log/clp"
    assert loaded.warnings == ()


def test_interpolation_default_may_contain_colon_and_dash():
    """A default may itself contain ``:`` and ``-`` (URLs, model names)."""
    config = parse("providers:\n  openai:\n    baseUrl: ${OPENAI_BASE:-http://local-host:8080/v1}\n").config
    assert config.providers.openai.base_url == "http://local-host:8080/v1"


def test_dollar_dollar_escapes_a_literal_reference():
    """``$${`` writes a literal ``${`` and is not looked up."""
    loaded = parse("state:\n  prefix: $${NOT_A_VAR}-x\n", {"NOT_A_VAR": "oops"})
    assert loaded.config.state.prefix == "${NOT_A_VAR}-x"
    assert loaded.warnings == ()


def test_unresolved_variable_becomes_empty_with_a_warning():
    """``${VAR}`` with VAR unset becomes "" and warns with the value's path and the variable's name."""
    loaded = parse("state:\n  prefix: pre-${UNSET_VAR}\n")
    assert loaded.config.state.prefix == "pre-"
    assert loaded.warnings == ("state.prefix: environment variable UNSET_VAR is not set",)


def test_unresolved_api_key_warning_names_path_and_variable():
    """The unset-variable warning for an account key names ``accounts.anthropic[0].apiKey`` and the variable."""
    loaded = parse("accounts:\n  anthropic:\n    - apiKey: ${ANTHROPIC_KEY_1}\n")
    assert loaded.warnings[0] == "accounts.anthropic[0].apiKey: environment variable ANTHROPIC_KEY_1 is not set"


def test_interpolation_inside_lists_and_nested_mappings():
    """References are resolved in list items and nested mappings (metadata, plugins) at any depth."""
    loaded = parse("""\
        routing:
          passthrough-models: [ "${M1}", "claude-${M2:-x}" ]
        cloaking:
          plugins:
            stamp: {values: ["${V}"]}
        accounts:
          anthropic:
            - apiKey: ${K}
              metadata: {owner: "${OWNER}", deep: [{x: "${MISSING_DEEP}"}]}
        """, {"M1": "model-one", "V": "v1", "K": "sk", "OWNER": "ops"})
    config = loaded.config
    assert config.routing.passthrough_models == ("model-one", "claude-x")
    assert config.cloaking.plugins["stamp"]["values"] == ("v1",)
    assert config.accounts[0].metadata["owner"] == "ops"
    assert config.accounts[0].metadata["deep"][0]["x"] == ""
    assert loaded.warnings == (
        "accounts.anthropic[0].metadata.deep[0].x: environment variable MISSING_DEEP is not set",)


def test_interpolated_values_are_plain_strings():
    """Values produced by interpolation are plain ``str`` objects in the result."""
    config = parse("state:\n  prefix: ${P}\naccounts:\n  anthropic:\n    - {apiKey: '${K}', metadata: {a: '${P}'}}\n",
                   {"P": "pp", "K": "sk"}).config
    assert type(config.state.prefix) is str
    assert type(config.accounts[0].api_key) is str
    assert type(config.accounts[0].metadata["a"]) is str


def test_keys_are_not_interpolated():
    """Mapping keys are taken literally; only values are interpolated."""
    config = parse("cloaking:\n  plugins:\n    ${NAME}: on\n", {"NAME": "x"}).config
    assert list(config.cloaking.plugins) == ["${NAME}"]


def test_interpolated_numbers_and_booleans_are_converted():
    """A number or boolean field whose value came from ``${...}`` accepts the string form."""
    config = parse(account_yaml("name: b\napiKey: ${K}\nweight: ${W:-3}\nenabled: ${E:-true}\n"
                                "rateLimit: ${RL}\n"), {"K": "s", "RL": "60"}).config
    assert (config.accounts[1].weight, config.accounts[1].enabled, config.accounts[1].rate_limit) == (3, True, 60)
    config = parse("server:\n  upstreamTimeout: ${T:-12.5}\nlogging:\n  debugBodies: ${D}\n", {"D": "False"}).config
    assert (config.server.upstream_timeout, config.logging.debug_bodies) == (12.5, False)


def test_interpolated_non_number_is_still_an_error():
    """An interpolated string that is not a number is rejected, showing the resolved value."""
    error = parse_error("server:\n  maxBodyBytes: ${SIZE}\n", {"SIZE": "huge"})
    assert str(error) == 'server.maxBodyBytes: must be a positive integer, got "huge"'


@pytest.mark.parametrize("value", ["${OPEN", "${}", "${1ABC}", "${A-b}"])
def test_malformed_reference_is_an_error(value):
    """A ``${`` that is not ``${NAME}`` or ``${NAME:-default}`` is an error at the value's path."""
    error = parse_error(f"state:\n  prefix: '{value}'\n")
    assert error.path == "state.prefix"
    assert "malformed" in error.problem


# --- secrets ----------------------------------------------------------------------------------------


def test_plaintext_account_key_warns():
    """An account apiKey written literally in the file earns the plaintext warning at its path."""
    loaded = parse("accounts:\n  anthropic:\n    - apiKey: sk-ant-literal\n")
    assert loaded.config.accounts[0].api_key == "sk-ant-literal"
    assert loaded.warnings == (
        "accounts.anthropic[0].apiKey: plaintext API key in config file; prefer ${ENV_VAR}",)


def test_plaintext_provider_key_warns():
    """A provider apiKey written literally in the file earns the plaintext warning at its path."""
    loaded = parse("providers:\n  openai:\n    apiKey: sk-proj-literal\n  google-ai:\n    api_key: ${G}\n",
                   {"G": "g"})
    assert loaded.warnings == (
        "providers.openai.apiKey: plaintext API key in config file; prefer ${ENV_VAR}",)
    assert loaded.config.providers.google_ai.api_key == "g"


def test_referenced_key_does_not_warn():
    """An apiKey given as ``${VAR}`` or with a default is not a plaintext warning."""
    loaded = parse("accounts:\n  anthropic:\n    - apiKey: ${K}\n    - {name: b, apiKey: '${K2:-sk-x}'}\n",
                   {"K": "sk"})
    assert loaded.warnings == ()


def _all_text(loaded=None, error=None):
    """Everything a user could see: warnings, notes, reprs and the error's message and repr."""
    parts = []
    if loaded is not None:
        parts += list(loaded.warnings) + list(loaded.notes) + [repr(loaded), repr(loaded.config), str(loaded)]
        parts += [repr(a) for a in loaded.config.accounts]
        parts += [repr(loaded.config.providers.openai), repr(loaded.config.providers.google_ai)]
    if error is not None:
        parts += [str(error), repr(error), error.path, error.problem, repr(error.args)]
    return "\n".join(parts)


def test_secret_never_appears_in_warnings_or_reprs():
    """A planted key (literal or from the environment) appears in no warning, note or repr."""
    loaded = parse(f"""\
        accounts:
          anthropic:
            - name: literal
              apiKey: {PLANTED}
            - name: env
              apiKey: ${{K}}
        providers:
          openai: {{apiKey: {PLANTED}}}
          google-ai: {{apiKey: "${{K}}"}}
        unknownSection: {{apiKey: {PLANTED}}}
        """, {"K": PLANTED + "-env"})
    assert loaded.config.accounts[0].api_key == PLANTED
    assert loaded.config.accounts[1].api_key == PLANTED + "-env"
    assert len(loaded.warnings) == 3
    assert PLANTED not in _all_text(loaded=loaded)
    assert "PLANTED" not in _all_text(loaded=loaded)


@pytest.mark.parametrize("text", [
    # an error in the same account as a literal key
    f"accounts:\n  anthropic:\n    - apiKey: {PLANTED}\n      weight: nope\n",
    # a malformed reference inside the key
    "accounts:\n  anthropic:\n    - apiKey: '" + PLANTED + "${'\n",
    # the key given as a number-like YAML value is described by type only
    "accounts:\n  anthropic:\n    - apiKey: [" + PLANTED + "]\n",
    # YAML syntax error on the line that holds the key
    "accounts:\n  anthropic:\n    - apiKey: " + PLANTED + "\n      weight: [1\n",
    "accounts:\n  anthropic:\n    - apiKey: '" + PLANTED + "\n",
    # broken JSON around the key
    '{"accounts": {"anthropic": [{"apiKey": "' + PLANTED + '" "x"}]}}',
    # a key pasted where a section or another value belongs
    f"providers:\n  openai: {PLANTED}\n",
    f"routing:\n  strategy: {PLANTED}\n",
    f"accounts:\n  anthropic:\n    - apiKey: ${{K}}\n      baseUrl: {PLANTED}\n",
    # duplicate-spelling error next to the key
    f"accounts:\n  anthropic:\n    - apiKey: {PLANTED}\n      api_key: {PLANTED}\n",
])
def test_secret_never_appears_in_errors(text):
    """Whatever goes wrong near a planted key, the ConfigError does not contain it."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "secret.yaml", {})
    assert "PLANTED" not in _all_text(error=info.value)


def test_wrongly_typed_secret_is_described_by_type():
    """A non-string apiKey is reported as ``got a number`` rather than by its value."""
    error = parse_error("providers:\n  openai:\n    apiKey: 123456789\n")
    assert str(error) == "providers.openai.apiKey: must be a string, got a number"


def test_env_file_bad_line_does_not_echo_secret(tmp_path):
    """A malformed env-file line is reported by number only, never by its content."""
    path = tmp_path / ".env"
    path.write_text(f"GOOD=1\nANTHROPIC_API_KEY {PLANTED}\n")
    with pytest.raises(ConfigError) as info:
        load_env_file(str(path))
    assert "PLANTED" not in _all_text(error=info.value)


# --- key spelling and unknown keys ------------------------------------------------------------------


def test_key_spelling_variants_are_equivalent():
    """camelCase, kebab-case and snake_case spellings of every key give the same config."""
    camel = """\
        accounts:
          anthropic:
            - {name: a, apiKey: "${K}", baseUrl: "https://x.example", orgId: o, rateLimit: 5}
        routing:
          strategy: round-robin
          modelMappings: [{from: a, to: b, provider: openai}]
          fallbackChain: [{provider: openai, model: m}]
          passthroughModels: [p]
        providers:
          anthropic: {oauthTokenUrl: "https://t.example", authorizeUrl: "https://a.example", clientId: c,
                      redirectUri: "https://r.example", refreshBeforeExpiry: 60}
          googleAi: {baseUrl: "https://g.example"}
        server: {maxBodyBytes: 10, upstreamTimeout: 1, connectTimeout: 2, requestDeadline: 3,
                 maxConnectionsPerHost: 4, drainTimeout: 5, keepaliveInterval: 6}
        logging: {retentionDays: 1, maxTotalMb: 2, debugBodies: true}
        """
    snake = (camel.replace("apiKey", "api_key").replace("baseUrl", "base_url").replace("orgId", "org_id")
             .replace("rateLimit", "rate_limit").replace("modelMappings", "model_mappings")
             .replace("fallbackChain", "fallback_chain").replace("passthroughModels", "passthrough_models")
             .replace("oauthTokenUrl", "oauth_token_url").replace("authorizeUrl", "authorize_url")
             .replace("clientId", "client_id").replace("redirectUri", "redirect_uri")
             .replace("refreshBeforeExpiry", "refresh_before_expiry").replace("googleAi", "google_ai")
             .replace("maxBodyBytes", "max_body_bytes").replace("upstreamTimeout", "upstream_timeout")
             .replace("connectTimeout", "connect_timeout").replace("requestDeadline", "request_deadline")
             .replace("maxConnectionsPerHost", "max_connections_per_host")
             .replace("drainTimeout", "drain_timeout").replace("keepaliveInterval", "keepalive_interval")
             .replace("retentionDays", "retention_days").replace("maxTotalMb", "max_total_mb")
             .replace("debugBodies", "debug_bodies"))
    kebab = snake.replace("_", "-")
    env = {"K": "sk"}
    results = [parse(text, env) for text in (camel, snake, kebab)]
    for loaded in results:
        assert loaded.warnings == ()
    assert results[0].config == results[1].config == results[2].config
    config = results[0].config
    assert config.server.max_connections_per_host == 4
    assert config.providers.google_ai.base_url == "https://g.example"
    assert config.accounts[0].rate_limit == 5
    assert config.logging.debug_bodies is True


def test_same_key_in_two_spellings_is_an_error():
    """Giving one key twice under different spellings is an error at the second spelling."""
    error = parse_error("server:\n  maxBodyBytes: 1\n  max-body-bytes: 2\n")
    assert error.path == "server.max-body-bytes"
    assert '"maxBodyBytes"' in error.problem


def test_unknown_key_warns_with_its_path():
    """An unknown key is a warning naming the key and where it is, not an error."""
    loaded = parse("routing:\n  foo: 1\n  strategy: fill-first\n")
    assert loaded.warnings == ('unknown key "foo" at routing',)


def test_unknown_keys_at_top_level_and_in_list_items():
    """Unknown keys are reported at the top level and inside list entries, with a close-match hint."""
    loaded = parse("""\
        telemetry: {}
        accounts:
          anthropic:
            - {apiKey: "${K}", wieght: 2}
        """, {"K": "s"})
    assert loaded.warnings == (
        'unknown key "wieght" at accounts.anthropic[0] (did you mean "weight"?)',
        'unknown key "telemetry" at top level',
    )


def test_metadata_and_plugin_keys_are_not_normalized_or_checked():
    """Keys inside metadata and plugin settings are user data: kept as written, never warned about."""
    loaded = parse("""\
        cloaking:
          plugins:
            someCamel: {inner-kebab: 1}
        accounts:
          anthropic:
            - apiKey: ${K}
              metadata: {ownerTeam: x}
        """, {"K": "s"})
    assert loaded.warnings == ()
    assert dict(loaded.config.cloaking.plugins["someCamel"]) == {"inner-kebab": 1}
    assert "ownerTeam" in loaded.config.accounts[0].metadata


# --- aliases and normalization ----------------------------------------------------------------------


@pytest.mark.parametrize("written, expected", [
    ("fill-first", "fill-first"), ("round-robin", "round-robin"), ("weighted-round-robin", "round-robin"),
    ("weighted", "round-robin"), ("Round_Robin", "round-robin"), ("FILL-FIRST", "fill-first"),
])
def test_strategy_aliases(written, expected):
    """Strategy names are case-insensitive and weighted round-robin is the same as round-robin."""
    assert parse(f"routing:\n  strategy: {written}\n").config.routing.strategy == expected


@pytest.mark.parametrize("written", ["google-ai", "gemini", "google", "vertex", "Gemini", "google_ai"])
def test_provider_aliases(written):
    """Gemini-ish provider names all normalize to ``google-ai``, in mappings and in the fallback chain."""
    config = parse(f"routing:\n  model-mappings: [{{from: a, to: b, provider: {written}}}]\n"
                   f"  fallback-chain: [{{provider: {written}, model: m}}]\n").config
    assert config.routing.model_mappings[0].provider == "google-ai"
    assert config.routing.fallback_chain[0].provider == "google-ai"


def test_gemini_provider_section_alias():
    """The provider section may be spelled ``gemini`` instead of ``google-ai``; both at once is an error."""
    config = parse("providers:\n  gemini:\n    apiKey: ${G}\n", {"G": "gk"}).config
    assert config.providers.google_ai.api_key == "gk"
    error = parse_error("providers:\n  gemini: {}\n  google-ai: {}\n")
    assert error.path == "providers.gemini"
    assert error.problem == 'same key as "google-ai" (an alias); give only one'


def test_mode_and_backend_are_case_insensitive():
    """Cloaking mode and state backend accept any letter case."""
    config = parse("cloaking: {mode: ALWAYS}\nstate: {backend: Redis, url: 'rediss://h:6380/1'}\n").config
    assert config.cloaking.mode == "always"
    assert (config.state.backend, config.state.url) == ("redis", "rediss://h:6380/1")


def test_base_url_trailing_slash_is_removed_and_scopes_string_is_split():
    """Base URLs lose a trailing slash; scopes may be one space-separated string."""
    config = parse("providers:\n  openai: {baseUrl: 'https://proxy.example/v1/'}\n"
                   "  anthropic: {scopes: 'user:inference user:profile'}\n").config
    assert config.providers.openai.base_url == "https://proxy.example/v1"
    assert config.providers.anthropic.scopes == ("user:inference", "user:profile")


# --- env files --------------------------------------------------------------------------------------


def test_env_file_parsing(tmp_path):
    """Env files accept comments, blank lines, ``export``, quotes and trailing comments."""
    path = tmp_path / ".env"
    path.write_text(textwrap.dedent("""\
        # a comment

        PLAIN=value
        export EXPORTED=yes
        DOUBLE="with spaces # not a comment"
        SINGLE='single=quoted'
        EMPTY=
          INDENTED = padded
        TRAILING=abc # comment
        QUOTED_COMMENT="q" # comment
        URL=https://x.example/#frag
        """))
    assert load_env_file(str(path)) == {
        "PLAIN": "value", "EXPORTED": "yes", "DOUBLE": "with spaces # not a comment",
        "SINGLE": "single=quoted", "EMPTY": "", "INDENTED": "padded", "TRAILING": "abc",
        "QUOTED_COMMENT": "q", "URL": "https://x.example/#frag",
    }


@pytest.mark.parametrize("bad_line", ["NO_EQUALS_SIGN", "1BAD=x", "BAD KEY=x", 'OPEN="unterminated',
                                      "'Q'=x", 'X="a" trailing'])
def test_env_file_bad_line(tmp_path, bad_line):
    """A line that is not KEY=VALUE raises ConfigError at ``<path>:<line>``."""
    path = tmp_path / ".env"
    path.write_text(f"# header\nOK=1\n{bad_line}\n")
    with pytest.raises(ConfigError) as info:
        load_env_file(str(path))
    assert info.value.path == f"{path}:3"
    assert info.value.problem == "expected KEY=VALUE"


def test_env_file_missing(tmp_path):
    """A missing env file is a ConfigError naming it."""
    missing = str(tmp_path / "none.env")
    with pytest.raises(ConfigError, match="env file not found"):
        load_env_file(missing)


def test_env_file_feeds_interpolation(tmp_path):
    """Variables read from an env file can be passed as the environment for interpolation."""
    env_path = tmp_path / ".env"
    env_path.write_text("export ANTHROPIC_API_KEY_PRIMARY='sk-from-file'\n")
    cfg_path = tmp_path / "proxy-config.yaml"
    cfg_path.write_text(SEED_EXAMPLE)
    loaded = load_config(str(cfg_path), load_env_file(str(env_path)))
    assert loaded.config.accounts[0].api_key == "sk-from-file"
    assert loaded.config.accounts[1].enabled is False


# --- per-account model and concurrency limits (issue 13) ---------------------------------------------


def test_excluded_models_and_max_concurrent_are_read():
    """``excludedModels`` (a list of patterns, or one string) and ``maxConcurrent`` reach the account."""
    config = parse(account_yaml('name: b\napiKey: ${K}\nexcludedModels: ["claude-opus-*", "*-haiku-*"]\n'
                                "maxConcurrent: 2\n"), {"K": "sk"}).config
    assert config.accounts[1].excluded_models == ("claude-opus-*", "*-haiku-*")
    assert config.accounts[1].max_concurrent == 2
    one = parse(account_yaml("name: b\napiKey: ${K}\nexcluded-models: claude-opus-4\n"), {"K": "sk"})
    assert one.config.accounts[1].excluded_models == ("claude-opus-4",)
    assert one.warnings == ()


def test_limits_default_to_none():
    """Without the keys: no excluded model and no concurrency cap."""
    config = parse(account_yaml("name: b\napiKey: ${K}\n"), {"K": "sk"}).config
    assert config.accounts[1].excluded_models == ()
    assert config.accounts[1].max_concurrent is None


@pytest.mark.parametrize("line, path, problem", [
    ("maxConcurrent: 0", "accounts.anthropic[1].maxConcurrent", "must be a positive integer, got 0"),
    ("maxConcurrent: 1.5", "accounts.anthropic[1].maxConcurrent", "must be a positive integer, got 1.5"),
    ("maxConcurrent: two", "accounts.anthropic[1].maxConcurrent", 'must be a positive integer, got "two"'),
    ("excludedModels: {a: 1}", "accounts.anthropic[1].excludedModels", "must be a list, got a mapping"),
    ('excludedModels: ["ok", 3]', "accounts.anthropic[1].excludedModels[1]", "must be a string, got 3"),
    ('excludedModels: ["ok", ""]', "accounts.anthropic[1].excludedModels[1]", "must not be empty"),
])
def test_limit_errors_name_the_key_path(line, path, problem):
    """Invalid limits are reported at their own key path."""
    error = parse_error(account_yaml("name: b\napiKey: ${K}\n" + line + "\n"), {"K": "sk"})
    assert (error.path, error.problem) == (path, problem)


# --- server.allowUnauthenticated (issue 14) --------------------------------------------------------


def test_allow_unauthenticated_defaults_to_false():
    """Without the key (or without a server section) an open bind stays refused."""
    assert parse("server:\n  maxBodyBytes: 10\n").config.server.allow_unauthenticated is False
    assert parse("version: 1\n").config.server.allow_unauthenticated is False


@pytest.mark.parametrize("spelling", ["allowUnauthenticated", "allow_unauthenticated",
                                      "allow-unauthenticated"])
def test_allow_unauthenticated_is_read_in_every_spelling(spelling):
    """``server.allowUnauthenticated: true`` is read, with no unknown-key warning."""
    loaded = parse(f"server:\n  {spelling}: true\n")
    assert loaded.config.server.allow_unauthenticated is True
    assert loaded.warnings == ()


def test_allow_unauthenticated_from_the_environment():
    """A ``${VAR}`` that holds true/false is accepted like the other booleans."""
    config = parse("server:\n  allowUnauthenticated: ${OPEN}\n", {"OPEN": "true"}).config
    assert config.server.allow_unauthenticated is True


@pytest.mark.parametrize("value, shown", [("'yes'", '"yes"'), ("1", "1"), ("[true]", "a list")])
def test_allow_unauthenticated_errors_name_the_key_path(value, shown):
    """Anything but a boolean is an error at ``server.allowUnauthenticated``."""
    error = parse_error(f"server:\n  allowUnauthenticated: {value}\n")
    assert (error.path, error.problem) == ("server.allowUnauthenticated",
                                           f"must be true or false, got {shown}")
