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


def shared(source, name: str, help: str | None = None, default=...):
    """Setting `name` of the config class `source` in another config: same name, flag and (unless given) help and
    default — one setting, not a copy (the corpus run's models are LLMConfig's, the sequence run's sizes are the
    synthetic run's)."""
    f = source.settings()[name]
    meta = dict(f.metadata)
    if help is not None:
        meta["help"] = help
    return field(default=f.default if default is ... else default, metadata=meta)


class Settings:
    """Mixin of a settings dataclass: its fields by name, and construction from keywords that refuses unknown names.
    ``RUN`` says whose settings they are in that error ("an LLM run")."""

    RUN = "a run"

    @classmethod
    def settings(cls) -> dict:
        """name → dataclass field, in declaration order (the command line and the API docs are built from it)."""
        return {f.name: f for f in fields(cls)}

    @classmethod
    def from_settings(cls, **settings):
        """A config from keyword settings; an unknown name is a ValueError naming it, with the closest known."""
        check_names(settings, cls.settings(), cls.RUN)
        return cls(**settings)
