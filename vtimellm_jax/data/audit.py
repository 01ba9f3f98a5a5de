"""Auditing one record: every fault that makes it unusable, and what the release would do with it.

One code path for `data check` (which lists everything) and the pipeline's planning pass (which
raises on, or skips, unusable records and counts the rest).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from vtimellm_jax import errors
from vtimellm_jax.data import records
from vtimellm_jax.data import templates


@dataclasses.dataclass
class Audit:
  """What is known about one record after checking it."""
  prepared: records.Prepared | None
  tokenized: templates.Tokenized | None
  faults: list[records.Fault]  # the record cannot be used
  notes: list[records.Fault]  # usable, but worth reporting (cut to fit, dropped by the release)

  @property
  def usable(self) -> bool:
    return not self.faults and self.prepared is not None


def audit_record(raw: Any, *, feature_faults: Callable[[records.Prepared], list[records.Fault]] | None,
                 enc=None, template: str | None = None,
                 max_length: int = templates.MAX_LENGTH) -> Audit:
  """Returns the audit of one raw record.

  Args:
    raw: the record as read from JSON (or ArrayRecord).
    feature_faults: checks the record's feature file; None skips the check.
    enc: an encoder of `tokenizer.load_encoder`; None skips tokenization (no length or
      release-drop findings).
    template: 'plain', 'v1' or 'glm'; None picks the release's (`templates.default_template`).
    max_length: the model sequence limit.
  """
  prepared, faults = records.prepare(raw)
  notes: list[records.Fault] = []
  tokenized = None
  if prepared is None:
    return Audit(None, None, faults, notes)
  if feature_faults is not None:
    faults.extend(feature_faults(prepared))
  if enc is not None:
    name = template or templates.default_template(enc, prepared.is_image)
    try:
      tokenized = templates.tokenize(prepared.turns, name, enc, max_length=max_length,
                                     num_features=prepared.num_features)
    except templates.OverLengthError as e:
      faults.append(records.Fault(records.OVER_LENGTH, str(e)))
    except errors.UserError as e:
      faults.append(records.Fault(records.BAD_FORMAT, str(e)))
    else:
      if tokenized.truncated:
        budget = templates.text_budget(max_length, prepared.num_features)
        notes.append(records.Fault(records.OVER_LENGTH, (
            f"{tokenized.full_length} text tokens + {prepared.num_features} features exceed "
            f"{max_length}: cut to {budget} text tokens")))
      if tokenized.release_dropped:
        notes.append(records.Fault(records.RELEASE_DROP, (
            "the release's per-round token count does not match the full tokenization, so it "
            "ignores every label of this sample")))
  return Audit(prepared, tokenized, faults, notes)
