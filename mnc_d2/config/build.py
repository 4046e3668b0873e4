"""``build_cfg``: a D2 config from a yaml file and command-line options, with mistakes reported as a
:class:`~mnc_d2.utils.errors.ConfigError` that names the file (the one of the ``_BASE_`` chain that holds the
mistake) or the option, and the key.

D2's ``merge_from_file`` / ``merge_from_list`` merge as usual (``_BASE_`` chain, config-version upgrades) and
yacs names an unknown key or a type mismatch; here that error gets the file or option that holds it.
"""
import difflib
import os

import yaml

from detectron2.config import CfgNode, get_cfg

from .defaults import FORMAT1_KEYS, add_mnc_config, upgrade_config_dict
from ..utils.errors import ConfigError

__all__ = ["build_cfg"]


def _yacs_key(error: Exception) -> str:
    """The key yacs names at the end of its KeyError / ValueError ("...config key: SOLVER.MAX_ITER")."""
    return str(error).strip("'\"").rsplit(" ", 1)[-1]


def _reason(defaults: CfgNode, error: Exception) -> str:
    """yacs' message, with the closest known key for an unknown one."""
    message, key = str(error).strip("'\""), _yacs_key(error)
    if "Non-existent" in message:
        leaves = [k for k, _ in _leaves(defaults)]
        close = difflib.get_close_matches(key, leaves, n=1)
        message = f"unknown config key {key}" + (f" (did you mean {close[0]}?)" if close else "")
    return message


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of each leaf of a config or a parsed yaml."""
    for key, value in node.items():
        yield from _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]


def _file_setting(config_file: str, key: str) -> str:
    """The file of ``config_file``'s ``_BASE_`` chain that sets ``key`` (what yacs cannot say), child first."""
    for path in _base_chain(config_file):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if isinstance(data, dict) and key in dict(_leaves(data)):
            return path if path == config_file else f"{path} (loaded from {config_file})"
    return config_file


def _base_chain(config_file: str) -> list:
    """``config_file`` and its ``_BASE_`` files, child first, up to the first one that comes again (a cycle)."""
    chain, path = [], config_file
    while path and os.path.isfile(path):
        chain.append(path)
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        base = data.get("_BASE_") if isinstance(data, dict) else None
        path = os.path.realpath(os.path.join(os.path.dirname(path), os.path.expanduser(base))) \
            if isinstance(base, str) and "://" not in base else None
        if path in map(os.path.realpath, chain):
            return chain + [path]
    return chain


def _merge_file(cfg: CfgNode, config_file: str) -> None:
    if not os.path.isfile(config_file):
        raise ConfigError(f"Config file {config_file} does not exist.")
    try:
        chain = _base_chain(config_file)
        if chain[-1] in map(os.path.realpath, chain[:-1]):  # D2's load_yaml_with_base would recurse without end
            raise ConfigError(f"Config file {config_file}: its _BASE_ chain comes back to a file: {' -> '.join(chain)}")
        merged = CfgNode.load_yaml_with_base(config_file, allow_unsafe=False)
        if not isinstance(merged, dict):
            raise ConfigError(f"Config file {config_file} is not a mapping of config keys.")
        if merged.get("VERSION", cfg.VERSION) == cfg.VERSION and upgrade_config_dict(merged, config_file):
            cfg.merge_from_other_cfg(CfgNode(merged))  # what D2's merge_from_file does for a current-version file
        else:
            cfg.merge_from_file(config_file)
    except ConfigError:
        raise
    except (KeyError, ValueError) as e:  # yacs: unknown key, type mismatch
        raise ConfigError(f"Config file {_file_setting(config_file, _yacs_key(e))}: {_reason(cfg, e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {config_file} is not valid YAML: {e}") from None
    except OSError as e:  # a _BASE_ that does not exist
        raise ConfigError(f"Config file {config_file}: {e}") from None


def _merge_opts(cfg: CfgNode, opts) -> None:
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if flags:
        raise ConfigError(f"Command-line flags {flags} come after the KEY VALUE config options; put them before.")
    if len(opts) % 2:
        raise ConfigError(f"Command-line config options must come in KEY VALUE pairs; got an odd list: {opts}")
    pairs = dict(zip(opts[0::2], opts[1::2]))
    for key, value in pairs.items():
        if key in FORMAT1_KEYS:
            raise ConfigError(f"Command-line option {key} {value}: a key of config format 1, replaced by "
                              f"{FORMAT1_KEYS[key]} (CHANGELOG.md)")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as e:
        key = _yacs_key(e)
        raise ConfigError(f"Command-line option {key} {pairs.get(key, '')}: {_reason(cfg, e)}") from None


def check_values(cfg) -> None:
    """Values the model would reject deep in its constructor, reported as the config key (the model's own
    checks, e.g. MODEL.MNC.NUM_STAGES and MODEL.MASK_ON, raise a ConfigError themselves)."""
    mnc = cfg.MODEL.MNC
    problems = {
        "MNC_RELIABILITY.BAD_TRAIN_IMAGE": (cfg.MNC_RELIABILITY.BAD_TRAIN_IMAGE not in ("skip", "raise"),
                                            "must be 'skip' or 'raise'"),
        "SOLVER.IMS_PER_BATCH": (cfg.SOLVER.IMS_PER_BATCH < 1, "must be >= 1"),
        "SOLVER.MAX_ITER": (cfg.SOLVER.MAX_ITER < 0, "must be >= 0"),
        "MODEL.MNC.MASK_HEAD.CONV_KERNEL": (mnc.MASK_HEAD.CONV_KERNEL not in (1, 3, 5, 7), "must be 1, 3, 5 or 7"),
        "MODEL.MNC.BOX_GRADIENTS.DELTA_CLIP": (mnc.BOX_GRADIENTS.DELTA_CLIP < 0, "must be >= 0 (0 = off)"),
    }
    for key, (bad, rule) in problems.items():
        if bad:
            value = cfg
            for part in key.split("."):
                value = value[part]
            raise ConfigError(f"{key} {rule}, got {value!r}")


def build_cfg(config_file: str, opts=()):
    """get_cfg -> add_mnc_config -> merge file -> merge opts -> check -> freeze; no side effects
    (``mnc_d2.engine.setup_cfg`` adds D2's default_setup: logging, seeding, config dump).

    Raises:
        ConfigError: naming the config file (the one of the _BASE_ chain that sets the key) or the
            command-line option, and the key, for a missing/invalid file, an unknown key or a value
            of the wrong type.
    """
    cfg = add_mnc_config(get_cfg())
    if config_file:
        _merge_file(cfg, config_file)
    _merge_opts(cfg, list(opts or ()))
    check_values(cfg)
    cfg.freeze()
    return cfg
