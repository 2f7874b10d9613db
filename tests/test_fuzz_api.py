"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis), against a real uvicorn server on loopback.

Seeded (hypothesis derandomized) and bounded: at least 500 generated requests over every operation,
none may answer 5xx, and the server must still be alive and classifying afterwards.
"""
from __future__ import annotations

import shutil

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

from test_serve import running_server  # noqa: E402

# per operation and mode (valid, invalid): the classify body is where the input space is
EXAMPLES = {"/v1/classify": 250, "/v1/admin/reload": 50}


def test_no_generated_request_gets_a_5xx_and_the_server_survives(base_bundle, tmp_path):
    import time

    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    bundle = tmp_path / "bundle"
    shutil.copytree(base_bundle, bundle)
    sent: list[tuple[str, str, int]] = []
    with running_server(bundle, admin_token="s3cret", watch_interval_s=0.05, max_queue=64) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/classify", "/v1/classes", "/v1/admin/reload", "/readyz"}
        for operation, mode in ((op, mode) for op in operations for mode in GenerationMode):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES.get(operation.path, 50), derandomize=True, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:
                response = case.call(timeout=30)
                sent.append((case.method, case.path, response.status_code))
                assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

            t0 = time.perf_counter()
            try:
                fuzz()
            except Unsatisfiable:  # an operation without parameters has no invalid form
                assert mode == GenerationMode.NEGATIVE
            print(operation.method, operation.path, mode, len(sent), f"{time.perf_counter() - t0:.1f}s")
        assert httpx.get(url + "/healthz").status_code == 200  # alive after the fuzzing
        assert httpx.get(url + "/v1/classes").json()["classes"]
    assert len(sent) >= 500, f"only {len(sent)} generated requests"
    assert not [s for s in sent if s[2] >= 500]
