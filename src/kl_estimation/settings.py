"""One configuration mechanism for every area (synthetic, sampled LLM, corpus): a run's settings are the fields of a
dataclass, each declared once with ``setting()`` — its default, its help, its flag and how argparse reads it. The
command lines (cli.add_settings), the API keywords and the scripts' defaults are all read from those fields.

``validate()`` on a config checks it and returns the config to run (a resolved copy where something resolves:
prompt files read, proposal names normalised); it never changes the config it is called on. This module imports
only the standard library and core (synthetic runs never load torch).
"""
from __future__ import annotations

from dataclasses import field, fields

from kl_estimation.core.validation import check_names


def setting(default, help: str, *, flag: bool | str = True, aliases: tuple = (), type=None, nargs=None):
    """A config field with what the command line needs: its help, its flag (``--`` + the name with dashes; a string
    names another flag, False keeps the setting API-only), accepted aliases (older flag names) and the argparse type
    and nargs."""
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple")
    meta = {"help": help, "flag": flag, "aliases": aliases, "type": type, "nargs": nargs}
    return field(default=default, metadata=meta)


def shared(source, name: str, help: str | None = None, default=..., nargs=None):
    """Setting `name` of the config class `source` in another config: same name, flag and (unless given) help and
    default — one setting, not a copy (the corpus run's models are LLMConfig's, the sequence run's sizes are the
    synthetic run's); `nargs` where it takes several (the corpus run's candidates)."""
    f = source.settings()[name]
    meta = dict(f.metadata)
    if help is not None:
        meta["help"] = help
    if nargs is not None:
        meta["nargs"] = nargs
    return field(default=f.default if default is ... else default, metadata=meta)


class Settings:
    """Mixin of a settings dataclass: its fields by name, and construction from keywords that refuses unknown names.
    ``RUN`` says whose settings they are in that error ("an LLM run")."""

    RUN = "a run"
    RUNS = "runs"  # the kind, in the plural: "a setting of sampled runs"
    NATURE = ""    # what sets the kind apart, said where a setting of another kind is given to it

    @classmethod
    def settings(cls) -> dict:
        """name → dataclass field, in declaration order (the command line and the API docs are built from it)."""
        return {f.name: f for f in fields(cls)}

    @classmethod
    def from_settings(cls, **settings):
        """A config from keyword settings; an unknown name is a ValueError naming it, with the closest known."""
        check_names(settings, cls.settings(), cls.RUN)
        return cls(**settings)


def other_mode(name: str, run_cls, other_cls, because: str | None = None) -> str | None:
    """The one line for a setting that belongs to another kind of run (a sampling setting in a corpus run, a sequence
    setting in a single-token synthetic run) — the API's error and the command line's alike; None where `name` is a
    setting of `run_cls`, or of neither. Which settings belong to which kind is read from the two config classes,
    nowhere else. `because`: what made this run what it is (the command line: the flag that chose the mode)."""
    if name in run_cls.settings() or name not in other_cls.settings():
        return None
    return f"{name}: a setting of {other_cls.RUNS}; {because or f'not of {run_cls.RUN}'}{run_cls.NATURE}"
