"""The `mmssl` dispatcher: every subcommand's --help, and one line for an unknown command."""

from __future__ import annotations

import pytest

from mmssl.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    try:
        code = main([name, "--help"])
    except SystemExit as exit_:  # argparse's --help
        code = exit_.code
    out = capsys.readouterr().out
    assert code == 0 and "usage:" in out, out


@pytest.mark.parametrize(
    "argv, hint",
    [(["evl", "zeroshot"], "did you mean 'eval'?"), (["--bogus"], ""), (["nope"], "")],
)
def test_unknown_command_is_one_line_naming_it(argv, hint, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err  # the house rule of mmssl.cliargs, not the usage block
    assert lines[0].startswith(f"mmssl: error: unknown command {argv[0]!r}; {hint}")
    assert lines[0].endswith("choose from " + ", ".join(COMMANDS))


def test_no_command_is_an_error_with_the_usage(capsys):
    # as argparse treats a missing subcommand (and git its missing command): usage, exit 2
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "commands:" in captured.err
    assert main(["--help"]) == 0 and "commands:" in capsys.readouterr().out


def test_every_command_help_lists_its_options(capsys):
    """`mmssl tokenizer --help` printed a usage line only; each command's --help is its whole
    help (exit 0, options listed)."""
    for name in COMMANDS:
        try:
            code = main([name, "--help"])
        except SystemExit as e:  # argparse exits after printing its help
            code = e.code
        out = capsys.readouterr().out
        assert code in (0, None), name
        assert out.startswith(f"usage: mmssl {name}") and "-h, --help" in out, (name, out[:300])


def test_python_dash_m_mmssl_is_the_mmssl_command():
    """`python -m mmssl` (no scripts on PATH) was "No module named mmssl.__main__"."""
    import subprocess
    import sys

    ok = subprocess.run(
        [sys.executable, "-m", "mmssl", "smoke", "--help"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "usage: mmssl smoke" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mmssl", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr
