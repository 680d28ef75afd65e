"""The vpmu suite: one test module per feature (run with ``python -m harness run``, ``pytest guest_tests`` in a
checkout, or ``pytest --pyargs harness.guest_tests`` from an installed wheel)."""
