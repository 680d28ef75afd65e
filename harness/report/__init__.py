"""What a run leaves behind (floor 6): results.json and everything read from it.

Owns the results schema and its whole-or-nothing writing (results), the feature matrix across hosts, profiles and
loads (matrix), its Markdown and HTML (render, svg), the distinct SKIP and ERROR reasons (skip_summary), the
night-to-night diff (diff) and KernelCI's KCIDB form (kcidb). Reads verdicts, never decides them. May import
harness.judge and every floor below it.
"""
