"""The reliability audit (issue 12): fault and bad-input cases kept as tests, on real data slices."""

from tests.test_search import folder, photos, zero_shot_dir  # noqa: F401  (shared fixtures)
