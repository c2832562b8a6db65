"""The built-in synthetic multilingual suite (offline, seeded): see world.py and languages.py."""
from .languages import SPECS as LANGUAGE_SPECS
from .world import DEFAULT_LANGUAGES, INTERMEDIATE_TASKS, TARGET_TASKS, SyntheticWorld

__all__ = ["DEFAULT_LANGUAGES", "INTERMEDIATE_TASKS", "LANGUAGE_SPECS", "SyntheticWorld", "TARGET_TASKS"]
