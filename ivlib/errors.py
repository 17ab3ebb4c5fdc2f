"""The one exception type that reaches the user as a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input from the user (flags, config, data, paths).

    Raised anywhere in the library; the CLI prints it on one line and exits 2 without a
    traceback, so a sweep script can tell "fix your command" apart from a crash.
    """
