"""The reliability audit (issue 12): fault and bad-input cases kept as tests, on real data slices."""

from hypothesis import HealthCheck, settings

from tests.test_search import folder, photos, zero_shot_dir  # noqa: F401  (shared fixtures)

# Property-based tests here run the same bounded examples every time (no example database, no
# randomness between runs), so a failure reproduces and CI time stays fixed.
SEEDED = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
