"""One exception type for user-facing failures: the CLI prints its message on one line and exits 1."""


class LutqError(RuntimeError):
    """A clear, user-facing error: say what is wrong and where (file, key, value)."""
