"""Settings: defaults < TOML file < PLINTH_* variables < flags, and nothing mistyped passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from plinth.server.config import ConfigError, load, tokens


def test_each_source_overrides_the_one_before(tmp_path):
    toml = tmp_path / "plinth.toml"
    toml.write_text('port = 7000\nhost = "0.0.0.0"\n[limits]\nmax_steps = 40\nmax_batch = 8\n')
    config = load(
        toml, env={"PLINTH_PORT": "7100", "PLINTH_LIMITS_MAX_BATCH": "4"}, flags={"port": 7200, "device": None}
    )
    assert (config.host, config.port, config.device) == ("0.0.0.0", 7200, "auto")
    assert (config.limits.max_steps, config.limits.max_batch) == (40, 4)


@pytest.mark.parametrize(
    "toml,env,where",
    [
        ("prot = 1\n", {}, "config file"),
        ("[limits]\nmax_steps = 'many'\n", {}, "config file"),
        ("", {"PLINTH_LIMITS_MAX_STEP": "5"}, "PLINTH_LIMITS_MAX_STEP"),
        ("", {"PLINTH_AUTH_TOKEN": "x"}, "PLINTH_AUTH_TOKEN"),  # the setting is PLINTH_AUTH_TOKENS
        ("", {"PLINTH_ALLOW_PICKLE": "perhaps"}, "allow_pickle"),
    ],
)
def test_mistakes_are_errors_that_say_where(tmp_path, toml, env, where):
    path = tmp_path / "plinth.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=where):
        load(path, env=env)


def test_client_and_home_variables_are_not_settings():
    assert load(None, env={"PLINTH_HOME": "/x", "PLINTH_TOKEN": "t"}).port == 50051


def test_tokens_come_from_the_setting_and_the_file(tmp_path):
    file = tmp_path / "tokens"
    file.write_text("# ops team\nfile-token\n\n   # indented comment\n")
    config = load(None, env={"PLINTH_AUTH_TOKENS": "a, b", "PLINTH_AUTH_TOKEN_FILE": str(file)})
    assert tokens(config.auth) == {"a", "b", "file-token"}
    assert isinstance(config.auth.token_file, Path)


def test_precision_and_batch_jobs_pick_the_dtype_and_slots_or_name_what_is_wrong():
    import torch

    from plinth.server.config import Config, ConfigError, batch_jobs, pick_device

    assert pick_device("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="float16' is for CUDA"):
        pick_device("cpu", "float16")
    with pytest.raises(ConfigError, match="'half' is not one of"):
        pick_device("cpu", "half")
    assert batch_jobs(Config(), torch.device("cpu")) == 1  # batching does not pay on this CPU
    assert batch_jobs(Config(), torch.device("cuda")) == 8
    assert batch_jobs(Config(batch_jobs=3), torch.device("cpu")) == 3
    with pytest.raises(ConfigError, match="batch_jobs must be"):
        batch_jobs(Config(batch_jobs=-1), torch.device("cpu"))
