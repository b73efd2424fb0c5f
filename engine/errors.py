"""Errors that reach the user: they say which file, line or field is wrong and are printed
by the CLI without a traceback."""


class InputError(ValueError):
    """Bad user input: a model folder, a data file, a constitution, a flag."""
