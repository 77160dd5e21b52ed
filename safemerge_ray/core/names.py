"""Module names in the order people read them."""


def natural_key(name: str) -> tuple:
    """Sort key that orders `layers.10` after `layers.9`."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
