"""One exception type for every user-facing mistake.

The CLI catches `FlowerdistError` and prints its message as a single line (exit status 2),
so a message must name the problem *and* the fix: the file, the key or the flag.
"""


class FlowerdistError(Exception):
    """A mistake in the user's input (config, data, checkpoint, launch), not a bug."""


#: Exit status of a run stopped by SIGTERM/SIGUSR1 after saving its checkpoint (requeue it).
EXIT_PREEMPTED = 3


class Preempted(Exception):
    """Raised after the checkpoint of a run stopped by SIGTERM/SIGUSR1 is on disk."""
