"""The proxy's configuration: the only place that reads YAML.

`schema` says what a configuration is (frozen dataclasses, the defaults),
`validate` turns parsed YAML into one (every problem, by YAML path), `keys`
finds the client keys (inline, a keys file, `${ENV}`), `load` reads the file,
and `summary` is what `check-config` prints.
"""

from proxy.config.load import FileStamp, load_config, read_config, stamp
from proxy.config.schema import (
    DEFAULT_BACKEND,
    PRIORITIES,
    RESTART_ONLY_KEYS,
    AccessConfig,
    AdminConfig,
    BackendConfig,
    ClusterConfig,
    Config,
    ConfigError,
    HealthConfig,
    HeartbeatConfig,
    IPNetwork,
    KeyProfile,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    MetricsConfig,
    RequestConfig,
    SchedulingConfig,
    TimeoutsConfig,
    UpstreamConfig,
)
from proxy.config.summary import config_warnings, describe_spool_dir, summary
from proxy.config.validate import config_from_dict

__all__ = [
    "PRIORITIES",
    "DEFAULT_BACKEND",
    "RESTART_ONLY_KEYS",
    "AccessConfig",
    "AdminConfig",
    "BackendConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "FileStamp",
    "HealthConfig",
    "HeartbeatConfig",
    "IPNetwork",
    "KeyProfile",
    "LimitsConfig",
    "ListenConfig",
    "LogConfig",
    "MetricsConfig",
    "RequestConfig",
    "SchedulingConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "config_from_dict",
    "config_warnings",
    "describe_spool_dir",
    "load_config",
    "read_config",
    "stamp",
    "summary",
]
