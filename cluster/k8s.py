"""(being written) sub-commands for this module."""


def register(subparsers) -> None:
    """Add this module's sub-commands to the `promptfleet` parser."""
