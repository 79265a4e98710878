"""One exception type for everything a user can get wrong.

The CLI turns a `DpokitError` into a single line on stderr and exit status 2; anything
else is a bug in dpokit and keeps its traceback.
"""


class DpokitError(Exception):
    """A problem with the user's input: config, data file, model path."""


class DataError(DpokitError):
    """A bad data row. Carries where it is so the message can name file and row."""

    def __init__(self, source: str, row: int | None, problem: str):
        self.source, self.row, self.problem = source, row, problem
        where = f"{source}, row {row}" if row is not None else source
        super().__init__(f"{where}: {problem}")
