"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): whatever a client sends, the
answer is never a server error, and its status, type and body are the ones the schema documents.

Requests the schema allows may still be refused (4xx): an upload of random bytes is not an image, and
a query of blanks has nothing to search for; the schema cannot say so, hence no acceptance check."""

from __future__ import annotations

import os
import shutil

import pytest
import schemathesis
from hypothesis import given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from starlette.testclient import TestClient

from cbir.index import update_index
from cbir.server import create_app
from tests.reliability.conftest import SEEDED, photos

# Per operation; CI runs 25 (seconds), `CBIR_FUZZ_EXAMPLES=300` fuzzes deeper (BENCHMARKS.md).
EXAMPLES = int(os.environ.get("CBIR_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, zero_shot_dir):
    """The served API over six real photos, one of them with a name that is not UTF-8."""
    folder = tmp_path_factory.mktemp("fuzz") / "photos"
    folder.mkdir()
    for p in photos(5):
        shutil.copy(p, folder / p.name)
    shutil.copy(photos(1, start=5)[0], folder / os.fsdecode(b"caf\xe9.jpg"))
    index, _ = update_index(folder, folder.parent / "ix", zero_shot_dir, progress=False)
    app = create_app(index)
    # The first explanation loads the image network (seconds on a busy machine): not a fuzzed answer.
    assert TestClient(app).get("/api/search", params={"q": "a dog", "explain": "true"}).status_code == 200
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_request_gets_a_server_error_or_an_undocumented_answer(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 6  # health, text, similar and upload search, image, thumbnail
    for operation in operations:

        @settings(SEEDED, max_examples=EXAMPLES)
        @given(case=operation.as_strategy())
        def no_server_error(case) -> None:
            case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=60)

        no_server_error()
