"""Typed recipe configs (placeholder; filled by the recipe loader)."""


class RecipeError(ValueError):
    pass
