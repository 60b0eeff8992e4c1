"""Errors a user's input causes (a config key or value, a missing dataset, an unreadable or
untrusted weights file, an unknown norm), told apart from bugs.

Each is raised with a message that names what is wrong, where, and the fix. Command-line
tools catch ``UserError``, print the message and exit with status 2, without a traceback;
any other exception keeps its traceback. The concrete classes also derive from the builtin
exception a caller would expect (``ValueError``, ``FileNotFoundError``, ...), so
``except ValueError`` keeps working.
"""
from __future__ import annotations

__all__ = ["UserError", "ConfigError"]


class UserError(Exception):
    """Raised for a mistake in what the user gave; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A config key or value that cannot work (unknown key, bad value, settings that don't fit
    a layer being built)."""
