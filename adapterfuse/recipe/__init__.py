"""Recipes: one YAML file from experts to verdict (see ``recipes/README.md``)."""

from adapterfuse.recipe.checks import check_recipe
from adapterfuse.recipe.runner import plan, run_recipe
from adapterfuse.recipe.schema import Recipe, load_recipe

__all__ = ["Recipe", "check_recipe", "load_recipe", "plan", "run_recipe"]
