"""The one error type of the method layer that a person can act on."""


class UserError(Exception):
    """Bad input a person can fix (unknown name, bad file, unreachable database): exit code 2."""
