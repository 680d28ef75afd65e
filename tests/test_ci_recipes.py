"""The CI recipes under ci/ run as written: they parse as YAML, target self-hosted KVM runners, do each step the
nightly job needs, and every vpmu command in them is accepted by vpmu's own argument parser (harness.cli)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

from harness.cli import make_parser
from harness.errors import UsageError
from harness.paths import REPO_ROOT

GITHUB = REPO_ROOT / "ci" / "github" / "vpmu-nightly.yml"
GITLAB = REPO_ROOT / "ci" / "gitlab" / "vpmu-nightly.gitlab-ci.yml"
#: Shell operators that end a simple command, and redirections (their next word is a file, not an argument).
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
REDIRECTIONS = {">", ">>", "<", "2>", "2>>", "&>", ">&"}
KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}", "time"}
#: What the nightly job must do with vpmu, in both recipes: (subcommand words, options that must be given).
REQUIRED = [
    (("doctor",), ()),
    (("image", "build"), ()),
    (("run",), ("--all-loads", "--out")),
    (("report", "diff"), ("--md",)),
    (("report", "kcidb"), ("--origin", "--out")),
]


def simple_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, as words (operators split off, redirections and keywords dropped)."""
    commands: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        line = re.sub(r"(?<=\s)\d(?=[<>])", "", line)  # 2> file: the descriptor number is not a word
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        skip_next = False
        for token in lexer:
            if skip_next:
                skip_next = False
            elif token in SEPARATORS:
                commands.append(words)
                words = []
            elif token in REDIRECTIONS or token.endswith((">", "<")):
                skip_next = True
            elif not words and token in KEYWORDS:
                continue
            else:
                words.append(token)
        commands.append(words)
    return [c for c in commands if c]


def vpmu_argv(words: list[str]) -> list[str] | None:
    """The arguments of a vpmu invocation (``python -m harness ...`` or ``vpmu ...``), else None."""
    for i, word in enumerate(words):
        if Path(word).name.startswith("python") and words[i + 1 : i + 3] == ["-m", "harness"]:
            return words[i + 3 :]
        if Path(word).name == "vpmu":
            return words[i + 1 :]
    return None


def exact_parser() -> argparse.ArgumentParser:
    """vpmu's parser, without argparse's abbreviations: a recipe must spell each option in full (``--all-load``
    works today only because no other option starts with it)."""
    parser = make_parser()
    pending = [parser]
    while pending:
        current = pending.pop()
        current.allow_abbrev = False
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += list(action.choices.values())
    return parser


def github_scripts() -> list[str]:
    workflow = yaml.safe_load(GITHUB.read_text())
    assert workflow.get("on", workflow.get(True)), "no trigger"  # YAML 1.1 reads the key `on` as True
    scripts = []
    for job in workflow["jobs"].values():
        labels = job["runs-on"]
        assert "self-hosted" in labels and "kvm" in labels and "x64" in labels, labels
        scripts += [step["run"] for step in job["steps"] if "run" in step]
    return scripts


def gitlab_scripts() -> list[str]:
    pipeline = yaml.safe_load(GITLAB.read_text())
    scripts = []
    for job in pipeline.values():
        assert "kvm" in job["tags"], job["tags"]
        assert job["artifacts"]["reports"]["junit"] == "out/junit.xml"
        scripts += [line for key in ("before_script", "script", "after_script") for line in job.get(key, [])]
    return scripts


@pytest.mark.parametrize("recipe", ["github", "gitlab"])
def test_every_vpmu_command_is_accepted_by_the_cli(recipe: str) -> None:
    scripts = github_scripts() if recipe == "github" else gitlab_scripts()
    commands = [words for script in scripts for words in simple_commands(script)]
    invocations = [argv for argv in map(vpmu_argv, commands) if argv is not None]
    parser = exact_parser()
    for argv in invocations:
        try:
            parser.parse_args(argv)
        except UsageError as exc:
            pytest.fail(f"{recipe}: `{shlex.join(argv)}` is not a vpmu command line: {exc}")
    for words, options in REQUIRED:
        matching = [argv for argv in invocations if argv[: len(words)] == list(words)]
        assert matching, f"{recipe}: no `{' '.join(words)}` step"
        assert any(set(options) <= set(argv) for argv in matching), f"{recipe}: `{' '.join(words)}` without {options}"
    for words in commands:  # programs of the checkout that the recipe runs exist
        if words[0].startswith("scripts/"):
            assert (REPO_ROOT / words[0]).is_file(), words[0]
    assert any(words[0] == "scripts/install" for words in commands), f"{recipe}: does not install"
    assert any(words[0] == "kcidb-submit" for words in commands), f"{recipe}: does not submit to KCIDB"


def test_the_checker_sees_wrong_commands() -> None:
    """The checks above can fail: a misspelt option, an unknown subcommand, and operators are split correctly."""
    parser = exact_parser()
    for script in (".venv/bin/python -m harness run --all-load --out out",
                   "vpmu report kcidb out/results.json --origin x --out k.json --bogus",
                   "if true; then vpmu report kcidb-submit r.json; fi"):  # fmt: skip
        (argv,) = [a for a in map(vpmu_argv, simple_commands(script)) if a is not None]
        with pytest.raises(UsageError):
            parser.parse_args(argv)
    assert simple_commands('a --x "$Y" > f.txt && b | c 2> err; if [ -f z ]; then d; fi') == [
        ["a", "--x", "$Y"], ["b"], ["c"], ["[", "-f", "z", "]"], ["d"]]  # fmt: skip
