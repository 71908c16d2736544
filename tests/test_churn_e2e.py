"""Churn equivalence on real CPU servers: one seeded random stream to kvflow and to stock SGLang.

See ``kvflow/harness/churn.py`` for the stream. ``KVFLOW_CHURN_REQUESTS`` sets its
size (generation requests per server; the default fits CI, about three minutes
with both servers' start-up) and ``KVFLOW_CHURN_SEED`` its seed.
"""

from __future__ import annotations

import os

import pytest

from kvflow.harness.churn import MAX_DETAILS, ChurnConfig, run_churn

pytestmark = pytest.mark.e2e

REQUESTS = int(os.environ.get("KVFLOW_CHURN_REQUESTS", str(ChurnConfig.requests)))
SEED = int(os.environ.get("KVFLOW_CHURN_SEED", "0"))


def test_churn_outputs_match_stock_and_both_servers_survive():
    result = run_churn(ChurnConfig(requests=REQUESTS, seed=SEED))
    print(result.summary())
    assert not result.failures, "\n".join(result.failures[:MAX_DETAILS])
    assert result.completed >= 0.7 * result.sent and result.compared >= result.completed
    assert result.aborted > 0 and result.ttl_expiries > 0
    assert result.registered > 0 and result.deleted > 0
    totals, evictions = result.stats["totals"], result.stats["evictions"]
    assert totals["hinted_requests"] > 0
    assert evictions["device"]["owned"]["nodes"] + evictions["device"]["unowned"]["nodes"] > 0
