"""The command lines' argument parser: an error is one line and a hint, not the whole usage."""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors print `PROG: error: MESSAGE` and where to read more; the
    usage block (two dozen lines for train) buried the one line that matters."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every option)\n")


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and adds each option's default to its help as
    `[DEFAULT]`, unless the help already names it or there is none."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if (d is None or d is argparse.SUPPRESS or d is False or "[" in h or "default" in h
                or not action.option_strings):
            return h
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else d
        return f"{h} [{shown}]"

