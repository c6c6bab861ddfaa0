"""Replayable augmented views: a counter-based generator (rng), the pixel operations (ops) and the recipes that combine
them.
"""

from kdcache.views.ops import pixel_hash, pixel_hashes
from kdcache.views.recipes import KINDS, MIXES, RECIPES, Recipe, make_recipe, normalize, parse_views, recipe_from_attrs
from kdcache.views.rng import philox4x32_10, view_words

__all__ = [
    "KINDS",
    "MIXES",
    "RECIPES",
    "Recipe",
    "make_recipe",
    "normalize",
    "parse_views",
    "philox4x32_10",
    "pixel_hash",
    "pixel_hashes",
    "recipe_from_attrs",
    "view_words",
]
