from tests.e2e.browser import browser  # noqa: F401  (the fixture, for every browser test here)
