"""How hard the fuzz tests try, in one place: ``make test`` keeps it small, ``make stress`` raises it."""

from __future__ import annotations

import os

# Examples schemathesis generates per API operation (and per instance fuzzed).
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
# Sequences of steps the pool's state machine test runs: cheap (about 10 ms each), so many more.
MODEL_EXAMPLES = 20 * FUZZ_EXAMPLES
