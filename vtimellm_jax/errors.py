"""Errors about the user's input: printed as one clear message by the CLI, never as a traceback."""


class UserError(Exception):
  """Bad input (file, record, flag). The message names the file, the record and what is wrong."""


class ConversionError(UserError):
  """A checkpoint could not be converted; the message lists every problem found, not just the first."""

  def __init__(self, source: str, problems: list[str]):
    self.source = source
    self.problems = list(problems)
    lines = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"cannot convert {source}: {len(self.problems)} problem(s)\n{lines}")
