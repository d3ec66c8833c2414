"""Errors shared by the command-line layers (kept apart so subcommands need not import `l3rs.cli`)."""


class UsageError(Exception):
    """A misuse of the command line: `l3rs` prints its one-line message and exits with code 2."""
