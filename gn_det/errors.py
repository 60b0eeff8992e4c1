"""Errors a user's input causes (a config key or value, a missing dataset, an unreadable or
untrusted weights file, an unknown norm), told apart from bugs.

Each is raised with a message that names what is wrong, where, and the fix. Command-line
tools run under ``exit_on_user_error``: a ``UserError`` prints its message and exits with
status 2, without a traceback; any other exception keeps its traceback. The concrete classes
also derive from the builtin exception a caller would expect (``ValueError``,
``FileNotFoundError``, ...), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

import contextlib
import difflib
import pickle
import re
import sys
from typing import Any, Iterable, Iterator, Mapping, Optional

__all__ = [
    "EXIT_USER_ERROR", "UserError", "ConfigError", "MissingFileError", "UnknownDatasetError", "DatasetError",
    "WeightsError", "UntrustedWeightsError", "DivergenceError", "OutputDirInUseError", "CheckpointWriteError",
    "ENVIRONMENT_VARIABLES", "check_environment",
    "close_matches", "config_merge_error", "exit_on_user_error",
]

EXIT_USER_ERROR = 2  # argparse's status for a bad command line: "you asked for something that cannot work"


class UserError(Exception):
    """Raised for a mistake in what the user gave; the message says what to change."""

    def __str__(self) -> str:
        # The message as given (KeyError's own str() would put it in quotes).
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(UserError, ValueError):
    """A config key or value that cannot work (unknown key, bad value, settings that don't fit
    a layer being built)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named, directly or through a config, is not there (a config
    file, a dataset's annotations or images, a weights file)."""


class UnknownDatasetError(UserError, KeyError):
    """A dataset name (``DATASETS.TRAIN``/``TEST``) that is not registered."""


class DatasetError(UserError, ValueError):
    """A dataset's annotation file that cannot be read as COCO (corrupt, truncated, missing
    sections)."""


class WeightsError(UserError, ValueError):
    """A weights file that cannot be loaded: corrupt, truncated, or not a checkpoint."""


class UntrustedWeightsError(WeightsError, pickle.UnpicklingError):
    """A weights file that names Python code to run when loaded; gn_det refuses to load it."""


class OutputDirInUseError(UserError, FileExistsError):
    """Another run holds the output folder's lock (``gn_det.train.checkpoint.OutputDirLock``):
    the message names the folder, the holder (host, pid, start, last heartbeat) and how to take
    the lock over when that run is gone."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (a full disk, a quota, a read-only or failing file
    system): the message names the file, the system's reason, the free space and the size
    needed. The previous checkpoint and ``last_checkpoint`` are kept, no temporary is left."""


class DivergenceError(UserError, FloatingPointError):
    """Training diverged (a NaN/Inf loss or prediction): the message names the iteration, the
    last losses and what to change. A ``UserError``, so tools print its one line, no traceback."""


# Every GN_DET_* environment variable gn_det or its tools read, and what reads it: any other
# GN_DET_ name is a typo that would be silently ignored.
ENVIRONMENT_VARIABLES = {
    "GN_DET_BACKEND": "gn_det.policy.switches", "GN_DET_TRITON_ON_CPU": "gn_det.policy.paths",
    "GN_DET_AUTOTUNE": "gn_det.policy.switches", "GN_DET_CACHE_DIR": "gn_det.policy.tuning",
    "GN_DET_ROUTES": "gn_det.policy.routing", "GN_DET_VENV": "tools/setup_env.sh", "GN_DET_TORCH": "tools/setup_env.sh",
    "GN_DET_TORCHVISION": "tools/setup_env.sh", "GN_DET_TORCH_FREE_MB": "tools/setup_env.sh",
}


def check_environment(environ: Optional[Mapping[str, str]] = None) -> None:
    """``ConfigError`` for a ``GN_DET_*`` variable gn_det does not read (with the closest names)."""
    import os

    environ = os.environ if environ is None else environ
    for name in sorted(environ):
        if name.startswith("GN_DET_") and name not in ENVIRONMENT_VARIABLES:
            raise ConfigError(f"environment variable {name}={environ[name]!r} is not one gn_det reads"
                              f"{close_matches(name, ENVIRONMENT_VARIABLES)} (known: {', '.join(ENVIRONMENT_VARIABLES)}); "
                              f"unset it or correct its name")


def close_matches(name: str, known: Iterable[str], n: int = 3) -> str:
    """``"; did you mean A or B?"`` for the known names closest to ``name``, or ``""``. A dotted
    name also matches known names that end with its last part (``MODEL.NUM_GROUPS`` ->
    ``MODEL.GN.NUM_GROUPS``), where the key is right and its section wrong."""
    known = list(known)
    matches = difflib.get_close_matches(name, known, n=n, cutoff=0.75)
    last = name.rsplit(".", 1)[-1]
    matches += [k for k in known if k.rsplit(".", 1)[-1] == last and k not in matches]
    matches = matches[:n]
    if not matches:
        return ""
    return "; did you mean " + " or ".join(matches) + "?"


def _config_keys(node: Mapping, prefix: str = "") -> Iterator[str]:
    for name, value in node.items():
        if isinstance(value, Mapping):
            yield from _config_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _config_value(cfg: Mapping, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


# What a value of each type is written like, for a value of another type given in its place.
_TYPE_HINTS = {
    "float": "write a float, e.g. 1.0 rather than 1",
    "int": "write a whole number",
    "bool": "write True or False",
    "tuple": "write a list as (1, 2) or [1, 2] (quoted for the shell), () for none",
    "list": "write a list as [1, 2] or (1, 2) (quoted for the shell), [] for none",
    "str": "quote it if it looks like a number",
}


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def config_merge_error(exc: Exception, cfg: Mapping, source: str, value: Optional[str] = None) -> ConfigError:
    """The ``ConfigError`` for an error yacs raised while merging ``source`` (a config file,
    or a KEY VALUE pair of the command line) into ``cfg``: an unknown key, with the closest
    known keys, or a value of another type than the key's value so far, with what it should look
    like. ``value``: the value as the user wrote it, where known (else yacs' rendering of it).
    yacs names the key in its messages ("Non-existent config key: K", "... for config key: K")."""
    message = str(exc.args[0]) if exc.args else str(exc)
    found = re.search(r"key: ([\w.]+)", message)
    key = found.group(1).rstrip(".") if found else ""
    if key and message.startswith("Non-existent"):
        return ConfigError(f"{source}: unknown config key {key}{close_matches(key, _config_keys(cfg))}")
    try:
        current = _config_value(cfg, key) if key else None
    except (KeyError, TypeError):
        current = None
    if isinstance(current, Mapping):
        keys = ", ".join(list(_config_keys(current, f"{key}."))[:4])
        return ConfigError(f"{source}: {key} is a section of keys, not a key; set one of them, e.g. {keys}")
    mismatch = re.search(r"\(<class '([\w.]+)'> vs\. <class '([\w.]+)'>\) with values \((.*) vs\. (.*)\) for config key",
                         message, flags=re.DOTALL)
    if key and mismatch:
        expected, given, default, rendered = mismatch.groups()
        expected, given = expected.rsplit(".", 1)[-1], given.rsplit(".", 1)[-1]  # (dotted class paths: the last part)
        if current is not None:
            default = repr(current)  # (else yacs' rendering of it)
        hint = _TYPE_HINTS.get(expected, f"give {_a(expected)}")
        return ConfigError(f"{source}: {key}={value if value is not None else rendered}: expected {_a(expected)} (its "
                           f"value so far: {default}), got {_a(given)}; {hint}")
    return ConfigError(f"{source}: {message}")  # e.g. yacs' "Key A was renamed to B, please update your config"


@contextlib.contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Run the block; a ``UserError`` ends the process with ``<prog>: error: <message>`` on
    stderr and status 2, no traceback. So does a worker process that ended that way (detectron2's
    ``launch`` raises ``ProcessExitedException`` with its exit status in the parent): the worker
    has printed the message already. Any other exception propagates, with its traceback."""
    try:
        yield
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except Exception as exc:
        if "torch.multiprocessing" in sys.modules:  # only then can a worker have run
            from torch.multiprocessing import ProcessExitedException

            if isinstance(exc, ProcessExitedException) and exc.exit_code == EXIT_USER_ERROR:
                raise SystemExit(EXIT_USER_ERROR) from None
        raise
