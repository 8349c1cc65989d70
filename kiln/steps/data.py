"""Calibration data: each recipe's calibration tokens and the held-out tokens validation scores on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kiln import progress
from kiln.calibration import TokenSet
from kiln.hub import ModelSnapshot
from kiln.profiles import BuildRequest, Evaluation, Recipe


@dataclass(frozen=True)
class Datasets:
    """Token ids for calibration (per recipe name) and the held-out text validation scores on; disjoint."""

    calibration: dict[str, TokenSet]
    heldout: TokenSet | None


def calibration_data(request: BuildRequest, snapshot: ModelSnapshot) -> Datasets:
    """Tokenise each recipe's calibration samples and the held-out text (checked disjoint from them)."""
    from kiln.hub import load_tokenizer

    with progress.step("data", f"{len(request.recipes)} recipe(s)"):
        return tokenize(request.recipes, request.evaluation, load_tokenizer(snapshot.path))


def tokenize(
    recipes: Sequence[Recipe], evaluation: Evaluation, tokenizer: Any, *, heldout: bool = True
) -> Datasets:
    """The calibration tokens of each recipe that calibrates and (``heldout``) the held-out tokens,
    checked disjoint."""
    from kiln.calibration import calibration_set, check_disjoint, heldout_set
    from kiln.quantize import needs_calibration

    calibration = {
        recipe.name: calibration_set(recipe.calibration, tokenizer)
        for recipe in recipes
        if needs_calibration(recipe)
    }
    held = heldout_set(evaluation, tokenizer) if heldout else None
    for samples in calibration.values() if held is not None else ():
        check_disjoint(held, samples, tokenizer=tokenizer)
    return Datasets(calibration=calibration, heldout=held)
