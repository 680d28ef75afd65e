"""Profile loading: the shipped file, and one-line errors naming file, profile and field."""

from __future__ import annotations

import pytest

from harness.errors import UsageError
from harness.suite.profiles import DEFAULT_PROFILES_FILE, load_profiles, select_profile
from tests.helpers import assert_one_line_error, run_cli


def test_shipped_profiles_apply_under_tcg():
    profiles = load_profiles()
    for name in ("pmu-off", "pmu-on"):
        assert profiles[name].applies_to("tcg")
    assert profiles["pmu-off"].cpu_for("kvm") == "host,pmu=off"
    assert profiles["pmu-off"].cpu_for("tcg") == "max,pmu=off"


def write(tmp_path, text):
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[p]\ndescription = "d"\ncpu = "host"\nacels = ["kvm"]\n', ["[p]", "unknown key 'acels'", "allowed:"]),
        ('[p]\ndescription = "d"\n', ["[p]", "missing field 'cpu'"]),
        ('[p]\ndescription = "d"\ncpu = 3\n', ["[p]", "field 'cpu' must be a str"]),
        ('[p]\ndescription = "d"\ncpu = "host"\naccels = ["hvf"]\n', ["'accels'", "allowed: kvm, tcg"]),
        ('[p]\ndescription = "d"\ncpu = "host"\naccels = []\n', ["'accels'", "no value"]),
        ('[p]\ndescription = "d"\ncpu = " "\n', ["field 'cpu' is empty"]),
        ("[p\n", ["not valid TOML", "line 1"]),
        ("", ["defines no profile"]),
        ('p = "x"\n', ["[p]", "must be a table"]),
    ],
)
def test_bad_profiles(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_profiles(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_tcg_cpu_default_and_override(tmp_path):
    path = write(tmp_path, '[a]\ndescription = "d"\ncpu = "host,pmu=on,+pdcm"\n'
                           '[b]\ndescription = "d"\ncpu = "host"\ntcg_cpu = "qemu64"\naccels = ["kvm"]\n')  # fmt: skip
    profiles = load_profiles(path)
    assert profiles["a"].cpu_for("tcg") == "max,pmu=on,+pdcm"
    assert profiles["b"].cpu_for("tcg") == "qemu64" and not profiles["b"].applies_to("tcg")


def test_unknown_profile():
    with pytest.raises(UsageError, match=r"no profile 'nope' \(known: pmu-off, pmu-on"):
        select_profile(load_profiles(), "nope", DEFAULT_PROFILES_FILE)


def test_cli_bad_profiles_file(tmp_path):
    path = write(tmp_path, '[p]\ndescription = "d"\ncpu = "host"\nchek = 1\n')
    proc = run_cli("exec", "--profiles-file", str(path), "--profile", "p", "--", "true")
    assert_one_line_error(proc, str(path), "[p]", "unknown key 'chek'")


def test_cli_unknown_profile():
    assert_one_line_error(run_cli("exec", "--profile", "nope", "--", "true"), "no profile 'nope'")


def test_cli_exec_without_command():
    assert_one_line_error(run_cli("exec"), "no command given")


def test_cli_unknown_subcommand():
    assert_one_line_error(run_cli("frobnicate"), "invalid choice")
