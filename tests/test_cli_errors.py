"""What the CLI shows when a command fails: one line for the user's mistakes, the traceback
for JAX errors and bugs; --debug / LUMOS_DEBUG=1 always the traceback; logs on stderr."""

import logging
import sys
import types

import jax.numpy as jnp
import pytest

from lumos_jax import cli
from lumos_jax.errors import UserError
from lumos_jax.evaluation.runner import resolve_concurrency


@pytest.fixture
def command(monkeypatch):
    """Registers `lumos-jax fake`, running whatever `body` the test sets."""
    module = types.ModuleType("fake_lumos_command")
    monkeypatch.setitem(sys.modules, "fake_lumos_command", module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("fake_lumos_command:main", "a test command"))
    monkeypatch.delenv("LUMOS_DEBUG", raising=False)
    monkeypatch.delenv("LUMOS_JAX_DEBUG", raising=False)

    def install(body):
        module.main = lambda argv: body()
    return install


def _user_error():
    raise UserError("data.json:3: 'task' is missing")


def _jax_error():
    return jnp.zeros((2, 3)) + jnp.zeros((4,))  # a ValueError raised inside jax


def test_own_errors_are_one_line(command, capsys):
    command(_user_error)
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err == "lumos-jax fake: error: data.json:3: 'task' is missing\n"
    command(lambda: resolve_concurrency(0))  # a plain ValueError raised in our own code
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "lumos-jax fake: error: eval concurrency must be an integer >= 1, got 0"]


def test_jax_errors_keep_their_traceback(command):
    command(_jax_error)
    with pytest.raises(ValueError, match="Incompatible shapes for broadcasting") as e:
        cli.main(["fake"])
    assert not cli.is_user_error(e.value)


@pytest.mark.parametrize("how", ["flag", "env", "old env"])
def test_debug_shows_every_traceback(command, monkeypatch, how):
    command(_user_error)
    argv = ["fake"]
    if how == "flag":
        argv = ["--debug", "fake"]
    else:
        monkeypatch.setenv("LUMOS_DEBUG" if how == "env" else "LUMOS_JAX_DEBUG", "1")
    with pytest.raises(UserError, match="'task' is missing"):
        cli.main(argv)


def test_logs_go_to_stderr_and_debug_logs_only_with_debug(command, capsys):
    log = logging.getLogger("lumos_jax.some.module")

    def body():
        log.info("resumed from step 3")
        log.debug("batch shapes (4, 128)")
        print("the command's output")
        return 0

    command(body)
    before = (logging.getLogger("lumos_jax").handlers[:], logging.getLogger("lumos_jax").level)
    assert cli.main(["fake"]) == 0
    out, err = capsys.readouterr()
    assert out == "the command's output\n" and err == "resumed from step 3\n"
    assert cli.main(["fake", "--debug"]) == 0
    assert capsys.readouterr().err == "resumed from step 3\nbatch shapes (4, 128)\n"
    # main runs inside other programs (tests, notebooks): the loggers are put back as they were
    assert (logging.getLogger("lumos_jax").handlers, logging.getLogger("lumos_jax").level) == before
