"""How hard the fuzz tests try, in one place: ``make test`` keeps it small, ``make stress`` raises it."""

from __future__ import annotations

import os

# Examples schemathesis generates per API operation (and per instance fuzzed).
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
# Sequences of steps the pool's state machine test runs: cheap (about 10 ms each), so many more.
MODEL_EXAMPLES = 20 * FUZZ_EXAMPLES
# A bound on the pool model's run per store, against a hang rather than slowness: it grows with the
# budget. At the default 400 sequences a store takes about 15 s of CPU; at `make stress`'s 10,000 the
# memory store took 824 s on a 2-core machine at load 11-16, past a fixed 300 s bound.
MODEL_TIMEOUT_S = 300 * max(1, MODEL_EXAMPLES // 400)
