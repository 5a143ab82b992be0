"""How hard the fuzz tests try, in one place: ``make test`` keeps it small, ``make stress`` raises it."""

from __future__ import annotations

import os

# Examples schemathesis generates per API operation (and per instance fuzzed).
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
