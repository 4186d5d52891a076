"""Preference learning for robot policies and reward models in simulation (the [robotics] extra)."""

from importlib.util import find_spec

from mmalign.errors import MissingDependencyError

_PACKAGES = {"gymnasium": "gymnasium", "metaworld": "metaworld", "ot": "POT", "scipy": "scipy",
             "stable_baselines3": "stable-baselines3"}  # module: package
_missing = [package for module, package in _PACKAGES.items() if find_spec(module) is None]
if _missing:
    raise MissingDependencyError(f"mmalign.robotics needs {', '.join(_missing)} (not installed): "
                                 "pip install 'mmalign[robotics]'")
