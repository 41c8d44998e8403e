"""Recipes: one YAML file from experts to verdict (see ``recipes/README.md``)."""
