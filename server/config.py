"""Server settings: defaults, then a TOML file, then PLINTH_* environment variables, then
command-line flags, each overriding the one before.

    # plinth.toml
    host = "0.0.0.0"
    port = 50051
    models_dir = "/srv/plinth/models"
    [limits]
    max_pixels = 4194304
    [auth]
    token_file = "/etc/plinth/tokens"

Every field below can be set in all three places: as a key (in its table for the nested
ones), as PLINTH_<NAME> or PLINTH_<TABLE>_<NAME> (e.g. PLINTH_LIMITS_MAX_STEPS=80), or as the
flag `plinth serve` has for it. Unknown keys are an error, so a typo never passes silently.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_HOME = Path(os.environ.get("PLINTH_HOME", Path.home() / ".plinth"))


# PLINTH_* variables that are not server settings: the home folder, the client's token.
OTHER_VARIABLES = frozenset({"PLINTH_HOME", "PLINTH_TOKEN"})


class ConfigError(ValueError):
    """A setting that does not parse or does not exist, named with where it came from."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past a limit the call fails with RESOURCE_EXHAUSTED."""

    max_pixels: int = 2048 * 2048  # width x height of any latent or image a graph asks for
    max_steps: int = 150
    max_batch: int = 64
    max_nodes: int = 500
    max_graph_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20  # one input image, uploaded whole or in chunks
    max_queue: int = 256  # queued jobs; more are refused with a retry hint
    max_message_bytes: int = 64 << 20  # gRPC messages, both ways


@dataclass(frozen=True)
class Auth:
    """Bearer tokens (one per line in token_file, or comma-separated in PLINTH_AUTH_TOKENS) and
    TLS. Tokens are required when binding anything but loopback."""

    token_file: Path | None = None
    tokens: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed (mTLS)


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 50051
    models_dir: Path = DEFAULT_HOME / "models"
    data_dir: Path = DEFAULT_HOME / "data"
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    cache_bytes: int = 2 << 30  # node output cache
    model_budget_bytes: int = 0  # 0: half of the device's memory
    # Host RAM for models moved off the GPU to make room (brought back without reading the file
    # again); 0: a quarter of RAM. Unused when the device is the CPU.
    offload_budget_bytes: int = 0
    precision: str = "auto"  # auto (float16 on CUDA, float32 on the CPU), float32, bfloat16, float16
    attention: str = "auto"  # auto (xformers on CUDA when the gpu extra is installed, else SDPA), sdpa, xformers
    channels_last: bool = True  # UNet and VAE in channels_last memory format, on CUDA only
    compile: bool = False  # torch.compile each UNet when it loads (slow first call; pays on long runs)
    warm_up: bool = True  # one small forward of each model as it loads, off the first job's clock
    # Jobs whose sampler steps are batched into one forward (same model, size and schedule
    # length; seeds, prompts, cfg and denoise may differ); 0: 8 on CUDA, 1 (off) on the CPU.
    batch_jobs: int = 0
    # List and load .ckpt/.pt/.pth/.bin files: read with torch.load(weights_only=True) into a
    # .safetensors copy under data_dir/converted. Off by default: pickles can run code.
    allow_pickle: bool = False
    metrics_port: int = 0  # 0: no Prometheus endpoint
    shutdown_grace: float = 30.0  # seconds a running job may finish after SIGTERM
    limits: Limits = field(default_factory=Limits)
    auth: Auth = field(default_factory=Auth)


def load(
    path: Path | None = None, env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None
) -> Config:
    """The config from `path` (TOML), then `env` (default os.environ), then `flags` (dotted
    names such as "limits.max_steps"; None values are ignored)."""
    config = Config()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        config = _apply(config, _flatten(data), f"config file {path}")
    env = os.environ if env is None else env
    by_variable = {"PLINTH_" + name.replace(".", "_").upper(): name for name in _names(config)}
    unknown = sorted(k for k in env if k.startswith("PLINTH_") and k not in by_variable and k not in OTHER_VARIABLES)
    if unknown:
        raise ConfigError(f"environment: unknown setting {unknown[0]} (settings: {', '.join(sorted(by_variable))})")
    from_env = {name: env[key] for key, name in by_variable.items() if key in env}
    config = _apply(config, from_env, "environment")
    return _apply(config, {k: v for k, v in (flags or {}).items() if v is not None}, "flags")


def _names(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        out.extend(_names(value, f"{prefix}{f.name}.") if is_dataclass(value) else [f"{prefix}{f.name}"])
    return out


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _apply(config: Config, values: Mapping[str, Any], source: str) -> Config:
    known = set(_names(config))
    for name, raw in values.items():
        if name not in known:
            raise ConfigError(f"{source}: unknown setting {name!r}")
        config = _set(config, name.split("."), raw, f"{source}: {name}")
    return config


def _set(obj: Any, path: list[str], raw: Any, where: str) -> Any:
    head = path[0]
    current = getattr(obj, head)
    if len(path) > 1:
        return replace(obj, **{head: _set(current, path[1:], raw, where)})
    kind = next(f.type for f in fields(obj) if f.name == head)
    return replace(obj, **{head: _parse(raw, str(kind), where)})


def _parse(raw: Any, kind: str, where: str) -> Any:
    try:
        if "tuple" in kind:
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if "Path" in kind:
            return Path(str(raw)).expanduser() if raw not in (None, "") else None
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError(f"not an integer: {raw!r}")
            return int(raw)
        if kind == "float":
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


# The dtypes `precision` may name besides "auto" (torch's names).
PRECISIONS = ("float32", "bfloat16", "float16")


def pick_device(name: str, precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when there is one, for "auto") and the dtype models run in: float16 on
    CUDA and float32 on the CPU unless `precision` names one (bfloat16 takes half the time of
    float32 on this project's CPU and moves pixels by 0.84 levels of 255 on average, 8 at most:
    bench/compare.py --compare-precision)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if precision == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    if precision == "float16" and device.type == "cpu":
        raise ConfigError("precision 'float16' is for CUDA; on the CPU use float32 or bfloat16")
    return device, getattr(torch, precision)


def batch_jobs(config: Config, device: torch.device) -> int:
    """How many jobs may run side by side with their sampler steps batched: config.batch_jobs,
    or for 0 (auto) 8 on CUDA and 1 on the CPU, where the UNet's cost grows linearly with the
    batch and batching only adds latency (bench/compare.py measures both)."""
    if config.batch_jobs < 0:
        raise ConfigError(f"batch_jobs must be 0 (auto) or more, not {config.batch_jobs}")
    return config.batch_jobs or (8 if device.type == "cuda" else 1)


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def model_budget(config: Config, device: torch.device) -> int:
    """config.model_budget_bytes, or for 0 half of the memory models live in (the GPU's, or
    RAM): room for weights beside activations and the output cache."""
    if config.model_budget_bytes:
        return config.model_budget_bytes
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[1] // 2
    ram = _ram_bytes()
    return 8 << 30 if ram is None else ram // 2


def offload_budget(config: Config, device: torch.device) -> int:
    """Host RAM for models moved off the device: none when the device is the CPU, else
    config.offload_budget_bytes, or for 0 a quarter of RAM."""
    if device.type == "cpu":
        return 0
    if config.offload_budget_bytes:
        return config.offload_budget_bytes
    ram = _ram_bytes()
    return 4 << 30 if ram is None else ram // 4


def tokens(auth: Auth) -> frozenset[str]:
    """Every accepted bearer token: those configured directly and those in the token file."""
    found = set(auth.tokens)
    if auth.token_file is not None:
        try:
            lines = Path(auth.token_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"auth.token_file {auth.token_file}: {exc}") from exc
        found.update(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    return frozenset(found)
