"""``build_cfg``: a D2 config from a yaml file and command-line options, with mistakes reported as a
:class:`~mnc_d2.utils.errors.ConfigError` that names the file (the one of the ``_BASE_`` chain that holds the
mistake) or the option, and the key.

Keys and value types are checked against the defaults tree BEFORE D2 merges anything (yacs' own type
rule, ``_check_and_coerce_cfg_value_type``); D2's ``merge_from_file`` / ``merge_from_list`` then merge
as usual (``_BASE_`` chain, config-version upgrades).
"""
import difflib
import os

import yaml
from yacs.config import _check_and_coerce_cfg_value_type

from detectron2.config import CfgNode, get_cfg

from .defaults import FORMAT1_KEYS, add_mnc_config, upgrade_config_dict
from ..utils.errors import ConfigError

__all__ = ["build_cfg"]


def _yaml_chain(config_file: str):
    """(path, parsed yaml) of ``config_file`` and its local ``_BASE_`` files, base first. Resolves
    ``_BASE_`` as D2's ``load_yaml_with_base`` does; a URL base ends the chain (D2 checks what it holds)."""
    chain, path = [], config_file
    while path:
        if not os.path.isfile(path):
            child = f" (the _BASE_ of {chain[0][0]})" if chain else ""
            raise ConfigError(f"Config file {path}{child} does not exist.")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file {path} is not valid YAML: {e}") from e
        chain.insert(0, (path, data))
        base = os.path.expanduser(data.get("_BASE_") or "") if isinstance(data, dict) else ""
        if base.startswith(("http://", "https://")):
            break
        path = base if not base or base.startswith("/") else os.path.join(os.path.dirname(path), base)
    return chain


def _check_key(defaults: CfgNode, key: str, value) -> str:
    """Why ``key`` (dotted) cannot take ``value`` under ``defaults``, or "" when it can."""
    node = defaults
    for part in key.split(".")[:-1]:
        node = node.get(part)
        if not isinstance(node, CfgNode):
            break
    name = key.split(".")[-1]
    if not isinstance(node, CfgNode) or name not in node:
        if defaults.key_is_deprecated(key) or defaults.key_is_renamed(key):
            return ""  # D2 explains those itself
        close = difflib.get_close_matches(key, list(_leaf_keys(defaults)), n=1)
        return f"unknown config key {key}" + (f" (did you mean {close[0]}?)" if close else "")
    default, value = node[name], CfgNode._decode_cfg_value(value)  # yacs decodes "(1, 2)" etc. when merging
    try:
        _check_and_coerce_cfg_value_type(value, default, name, key)
    except ValueError:
        return f"config key {key} expects {type(default)} (default {default!r}), got {type(value)} {value!r}"
    return ""


def _leaf_keys(node: CfgNode, prefix: str = ""):
    for key, value in node.items():
        yield from _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, CfgNode) else [prefix + key]


def _leaf_items(data: dict, prefix: str = ""):
    """(dotted key, value) of each leaf of a parsed yaml."""
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaf_items(value, f"{prefix}{key}.")
        elif f"{prefix}{key}" != "_BASE_":
            yield f"{prefix}{key}", value


def _merge_file(cfg: CfgNode, config_file: str) -> None:
    for path, data in _yaml_chain(config_file):
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} is not a mapping of config keys.")
        if data.get("VERSION", cfg.VERSION) != cfg.VERSION:
            break  # an old-version config: D2 upgrades its keys while merging
        for key, value in _leaf_items(data):
            if key in FORMAT1_KEYS:
                continue  # upgraded below
            reason = _check_key(cfg, key, value)
            if reason:
                via = f" (loaded from {config_file})" if path != config_file else ""
                raise ConfigError(f"Config file {path}{via}: {reason}")
    merged = CfgNode.load_yaml_with_base(config_file, allow_unsafe=False)
    if merged.get("VERSION", cfg.VERSION) == cfg.VERSION and upgrade_config_dict(merged, config_file):
        cfg.merge_from_other_cfg(CfgNode(merged))  # what D2's merge_from_file does for a current-version file
    else:
        cfg.merge_from_file(config_file)


def _merge_opts(cfg: CfgNode, opts) -> None:
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if flags:
        raise ConfigError(f"Command-line flags {flags} come after the KEY VALUE config options; put them before.")
    if len(opts) % 2:
        raise ConfigError(f"Command-line config options must come in KEY VALUE pairs; got an odd list: {opts}")
    for key, value in zip(opts[0::2], opts[1::2]):
        reason = (f"a key of config format 1, replaced by {FORMAT1_KEYS[key]} (CHANGELOG.md)"
                  if key in FORMAT1_KEYS else _check_key(cfg, key, value))
        if reason:
            raise ConfigError(f"Command-line option {key} {value}: {reason}")
    cfg.merge_from_list(opts)


def _check_values(cfg) -> None:
    """Values the model would reject deep in its constructor, reported as the config key."""
    mnc = cfg.MODEL.MNC
    problems = {
        "MNC_RELIABILITY.BAD_TRAIN_IMAGE": (cfg.MNC_RELIABILITY.BAD_TRAIN_IMAGE not in ("skip", "raise"),
                                            "must be 'skip' or 'raise'"),
        "MODEL.MNC.NUM_STAGES": (mnc.NUM_STAGES not in (3, 5), "must be 3 or 5"),
        "MODEL.MNC.MASK_HEAD.CONV_KERNEL": (mnc.MASK_HEAD.CONV_KERNEL not in (1, 3, 5, 7), "must be 1, 3, 5 or 7"),
        "MODEL.MNC.BOX_GRADIENTS.DELTA_CLIP": (mnc.BOX_GRADIENTS.DELTA_CLIP < 0, "must be >= 0 (0 = off)"),
        "MODEL.MNC.FINAL_MASK_HEAD.ENABLED": (mnc.FINAL_MASK_HEAD.ENABLED and not mnc.TEST.MASKS_ON_FINAL_BOXES,
                                              "needs MODEL.MNC.TEST.MASKS_ON_FINAL_BOXES True (the output mask head "
                                              "predicts the masks on the final boxes)"),
        "MODEL.MASK_ON": (cfg.MODEL.META_ARCHITECTURE == "MNC" and not cfg.MODEL.MASK_ON,
                          "must be True for MNC, which trains masks in stage 2 (D2's Faster R-CNN configs set False; "
                          "without it the data loader drops the masks)"),
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
    _check_values(cfg)
    cfg.freeze()
    return cfg
