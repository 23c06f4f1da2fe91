"""A pytest plugin the mutation runner loads (`-p tests.mutants.noshrink`): Hypothesis reports the first
failing example it finds instead of shrinking it.

A mutation run asks one question, does the model test fail, and shrinking only makes the answer
prettier: the model test's failures took minutes to shrink (five for one 25-step sequence on two
cores), longer than finding them. Dropping the shrink phase changes nothing that decides the verdict
or the count of examples to the failure, since shrinking starts only once a failure was found. The
model test names its phases explicitly, so no settings profile can drop one: the phases every
`settings(...)` is given are filtered on their way in, and the default profile loses shrinking too.
"""

from __future__ import annotations

import sys

from hypothesis import Phase, settings

try:
    from hypothesis import _settings as _hypothesis_settings

    _validate_phases = _hypothesis_settings._validate_phases
except (ImportError, AttributeError):  # another Hypothesis: leave it shrinking, and say so
    print("tests.mutants.noshrink: this Hypothesis has no _settings._validate_phases; shrinking stays on",
          file=sys.stderr)
else:
    def _phases_without_shrink(phases):
        return tuple(phase for phase in _validate_phases(phases) if phase is not Phase.shrink)

    _hypothesis_settings._validate_phases = _phases_without_shrink
    settings.register_profile("mutants-no-shrink", phases=[phase for phase in Phase if phase is not Phase.shrink])
    settings.load_profile("mutants-no-shrink")
