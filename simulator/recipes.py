"""The image recipes of the docker backend, as data: which Debian suites have an image, what
goes into each, and the tag each builds. Pure (no Docker, no network), so ``check``, the
pytest plugin and ``up`` can refuse a topology the docker backend could not run before
anything starts; :mod:`simulator.images` builds the images from these recipes.

The recipe files are package data of ``simulator`` (``simulator/containers/``), so an
installed wheel builds the same images, with the same tags, as a clone of the repository.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, Optional, Tuple

__all__ = [
    "IMAGE_REPO",
    "LABEL_PREFIX",
    "RECIPE_DIR",
    "RECIPE_FILES",
    "RECIPE_VERSION",
    "ImageBuildError",
    "SuiteRecipe",
    "UnknownSuiteError",
    "image_tag",
    "load_recipes",
    "recipe",
]

#: Bump when the build logic of simulator/images.py changes in a way that changes image
#: contents.
RECIPE_VERSION = 1
RECIPE_DIR = Path(__file__).resolve().parent / "containers"
#: The recipe files whose bytes are part of every image's hash.
RECIPE_FILES = ("entrypoint.sh", "node_setup.py", "sshd_config", "finalize-rootfs.sh")
IMAGE_REPO = "mitogen-sim"
LABEL_PREFIX = "mitogen-sim."
_VERSIONED_PYTHON = re.compile(r"python[0-9]+\.[0-9]+")


class ImageBuildError(RuntimeError):
    """An image could not be built; the message says which step failed and why."""


class UnknownSuiteError(ImageBuildError, KeyError):
    """A suite that simulator/containers/suites.json has no recipe for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# --- recipes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteRecipe:
    """Everything that decides the contents of one suite's image."""

    suite: str
    variant: str
    packages: Tuple[str, ...]
    python: Optional[str]  # the python3 major.minor a stable suite must give; None: rolling
    recipe_dir: Path

    def content_hash(self) -> str:
        """sha256 over every build input; equal hashes mean interchangeable images."""
        files = {name: hashlib.sha256((self.recipe_dir / name).read_bytes()).hexdigest()
                 for name in RECIPE_FILES}
        inputs = {
            "recipe_version": RECIPE_VERSION,
            "suite": self.suite,
            "variant": self.variant,
            "packages": sorted(self.packages),
            "python": self.python,
            "machine": platform.machine(),
            "files": files,
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    def offers(self, interpreter: str) -> bool:
        """Whether the image has ``interpreter`` (``python3``, ``python3.11``...): python3
        and its versioned name, and any versioned python among the packages. A rolling suite
        (no ``python`` in the recipe) offers whichever python3.N it has when built."""
        if interpreter == "python3":
            return True
        if interpreter in self.extra_interpreters:
            return True
        if self.python is None:
            return interpreter.startswith("python3.")
        return interpreter == f"python{self.python}"

    @property
    def extra_interpreters(self) -> FrozenSet[str]:
        return frozenset(p for p in self.packages if _VERSIONED_PYTHON.fullmatch(p))

    @property
    def repository(self) -> str:
        return f"{IMAGE_REPO}/{self.suite}"

    @property
    def tag(self) -> str:
        return f"{self.repository}:{self.content_hash()[:16]}"


def load_recipes(recipe_dir: Path = RECIPE_DIR) -> Dict[str, SuiteRecipe]:
    """Read suites.json into one recipe per suite."""
    path = recipe_dir / "suites.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ImageBuildError(f"cannot read the image recipes {path}: {exc}") from None
    common = tuple(spec.get("packages", ()))
    recipes = {}
    for suite, entry in spec.get("suites", {}).items():
        packages = common + tuple(entry.get("extra_packages", ()))
        recipes[suite] = SuiteRecipe(suite=suite, variant=spec.get("variant", "minbase"),
                                     packages=packages, python=entry.get("python"),
                                     recipe_dir=recipe_dir)
    return recipes


def recipe(suite: str, recipe_dir: Path = RECIPE_DIR) -> SuiteRecipe:
    recipes = load_recipes(recipe_dir)
    if suite not in recipes:
        raise UnknownSuiteError(f"unknown suite {suite!r}; {recipe_dir / 'suites.json'} has "
                                f"recipes for: {', '.join(sorted(recipes))}")
    return recipes[suite]


def image_tag(suite: str) -> str:
    """The tag the current recipe of ``suite`` builds (whether or not it is built yet)."""
    return recipe(suite).tag
