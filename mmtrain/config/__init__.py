"""Config layer: compose recipe configs with Hydra, build components from ``_target_``, report problems.

Recipe-facing API::

    cfg = load("contrastive", "align_tiny", ["optimizer.lr=3e-4", "model/attention=local"])
    model = instantiate(cfg.model)                         # _target_ allowlist, one-line ConfigError
    optimizer = instantiate(cfg.optimizer)(model.parameters())   # _partial_: true factory
    def validate(cfg, report: ValidationReport): report.error("key.path", "cause"); report.info("note")
    if __name__ == "__main__": recipe_entry(main)          # python recipes/x.py --config C overrides...
"""

from mmtrain.config._common_checks import check_common_keys
from mmtrain.config._compose import load
from mmtrain.config._entry import import_recipe, recipe_entry, run_recipe_main
from mmtrain.config._instantiate import (
    ALLOWED_TARGET_PREFIXES,
    check_targets,
    instantiate,
    is_target_allowed,
    locate,
)
from mmtrain.config._paths import (
    builtin_configs_dir,
    builtin_recipe_names,
    builtin_recipes_dir,
    config_names_for,
    recipe_description,
    resolve_config,
    resolve_recipe,
)
from mmtrain.config._state import allow_any_target, set_allow_any_target, source_of
from mmtrain.config._validate import ValidationIssue, ValidationReport, validate_components
from mmtrain.errors import ConfigError

__all__ = [
    "ALLOWED_TARGET_PREFIXES",
    "ConfigError",
    "ValidationIssue",
    "ValidationReport",
    "check_common_keys",
    "allow_any_target",
    "builtin_configs_dir",
    "builtin_recipe_names",
    "builtin_recipes_dir",
    "check_targets",
    "config_names_for",
    "import_recipe",
    "instantiate",
    "is_target_allowed",
    "load",
    "locate",
    "recipe_description",
    "recipe_entry",
    "resolve_config",
    "resolve_recipe",
    "run_recipe_main",
    "set_allow_any_target",
    "source_of",
    "validate_components",
]
