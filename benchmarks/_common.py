"""Helpers the benchmark scripts share."""


def rel_err(a, b) -> float:
    """Relative L2 error of a against b, computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
