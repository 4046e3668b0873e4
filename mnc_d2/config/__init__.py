"""Config: MNC's keys and their defaults (``add_mnc_config``), building and checking a yacs config from files and
command-line options (``build_cfg``), upgrading configs of an earlier format, and loading Python (LazyConfig) configs."""
from .build import build_cfg
from .defaults import CONFIG_VERSION, FORMAT1_KEYS, add_mnc_config, upgrade_config_dict

__all__ = ["CONFIG_VERSION", "FORMAT1_KEYS", "add_mnc_config", "build_cfg", "upgrade_config_dict"]
