"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class TempoError(Exception):
    """Bad input from a user (arguments, files); the message says what is wrong and where."""
