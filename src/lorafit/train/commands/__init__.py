"""The ``train``, ``eval`` and ``generate`` subcommands (one module each, listed in `lorafit.cli.COMMANDS`)."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Option defaults in the help; lines indented by two spaces (the config table) stay as written."""

    def _fill_text(self, text, width, indent):
        return "\n".join(line if line.startswith("  ") else super(HelpFormatter, self)._fill_text(line, width, indent)
                         for line in text.splitlines())
