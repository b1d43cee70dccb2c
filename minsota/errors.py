"""Errors a user can cause, and the exit codes the CLI documents for them.

Every command exits 0 when it succeeds, 1 on an internal error or a failed checkpoint write (disk full),
2 on a user error (bad recipe, argument, plugin, data source or checkpoint), 3 when training diverges,
130 after SIGINT, 141 when stdout's reader has gone (`| head`) and 143 after SIGTERM.
A `UserError` is printed as one line (no traceback unless MINSOTA_DEBUG=1).
"""

import difflib

# after a signal: 128 + its number (minsota.train)
EXIT_INTERNAL, EXIT_USER, EXIT_DIVERGED, EXIT_SIGINT, EXIT_SIGPIPE = 1, 2, 3, 130, 141


def did_you_mean(name: str, choices) -> str:
    """The hint "did you mean 'a', 'b'?" with up to three close matches of ``name`` among ``choices`` ('' when
    none): for an error message, never a silent pick."""
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f"did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class UserError(Exception):
    """A mistake in what the user asked for; the message names the file, key, plugin or step."""

    exit_code = EXIT_USER


class DivergedError(UserError):
    """Training produced a non-finite loss or gradient norm."""

    exit_code = EXIT_DIVERGED


class SaveError(UserError):
    """Writing a checkpoint failed (disk full, I/O error); earlier checkpoints are intact. One line, exit 1."""

    exit_code = EXIT_INTERNAL
