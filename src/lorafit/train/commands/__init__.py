"""The ``train``, ``eval`` and ``generate`` subcommands (one module each, listed in `lorafit.cli.COMMANDS`)."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults in the help, and epilogs (the config reference) kept as written."""
