"""Experiments that rerun a result from a paper on a controlled task; `dpokit experiment NAME`."""
