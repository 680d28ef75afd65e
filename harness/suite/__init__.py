"""A run (floor 7, the top floor): profiles, one booted guest per profile, and the pytest plugin that drives them.

Owns profiles.toml loading (profiles), one profile's guest for a whole session (profile_run), the pytest plugin
with its options, markers and check outcomes (pytest_plugin), the session's state and selection (session), its
fixtures (fixtures) and the files it writes (session_results), rejudging a stored run (replay) and the drivers that
act on a guest or the host mid-run: the life cycle under QMP (lifecycle), the mux sweep (mux_sweep) and a host load
started before the VM exists (before_boot). May import every floor; only the CLI (harness.cli) sits above it.
"""
