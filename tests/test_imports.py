"""Every module imports (catches dead imports and cycles), and the public API is where the docs say."""

from __future__ import annotations

import importlib
import pkgutil

import prefkit


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(prefkit.__path__, "prefkit.")]
    assert "prefkit.objectives.links" in names and "prefkit.dynamics.calibration" in names
    for name in names:
        if name != "prefkit.__main__":  # running it would parse sys.argv
            importlib.import_module(name)
    assert prefkit.PrefConfig.__name__ == "PrefConfig" and prefkit.PrefTrainer.__name__ == "PrefTrainer"
