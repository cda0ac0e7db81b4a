"""How every glmx command ends: the command group's failures as one `Error:` line and exit status 1 (a glmx error
with its fix, an operating-system error with its file, a usage error after click's usage line, anything else as a
bug), and a closed stdout quietly. In: the exceptions a command raises. Out: click exceptions with glmx's words."""

from __future__ import annotations

import sys

import click


class CommandError(click.ClickException):
    """A command's failure as click prints it: one `Error:` line, exit status 1 (every glm_runtime.errors.GLMXError
    reaching the command group becomes one)."""


def one_line(exc: BaseException) -> str:
    """The first line of a message, whitespace folded (a parity table was printed above it already)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[0].split()) if lines else type(exc).__name__


PIPE_CLOSED = 141  # 128 + SIGPIPE: the status a shell shows for a tool the closed pipe ended (yes | head -1)


def stdout_closed() -> click.exceptions.Exit:
    """The reader of stdout went away (`glmx fill --stdin < lines | head -1`): stop quietly, as Unix tools do.
    stdout is pointed at /dev/null first, so the interpreter's last flush at exit cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # a stdout without a file descriptor (a test's buffer): nothing to flush there
        pass
    return click.exceptions.Exit(PIPE_CLOSED)


class UsageError(click.UsageError):
    """click's usage error (the usage line, then one Error line) with glmx's exit status for every failure, 1."""

    exit_code = 1


class NoCommand(click.exceptions.NoArgsIsHelpError):
    """`glmx` alone: the help, as click shows it, with exit status 1 (no command ran)."""

    exit_code = 1


def _exits_1(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        assert exc.ctx is not None
        return NoCommand(exc.ctx)
    return UsageError(exc.format_message(), exc.ctx)  # with the option it names (BadParameter)


class Commands(click.Group):
    """Every command's failures end as one line on stderr and exit status 1: a glmx error with its own message
    and fix, an operating-system error with the file it concerns; anything else is a bug in glmx, said so in one
    line (GLMX_DEBUG=1 shows the traceback). A usage error (unknown option or command, bad or missing value) is
    click's own usage line and one Error line, with exit status 1 too. A closed stdout ends the command quietly
    (PIPE_CLOSED)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:  # the group's own options
            raise _exits_1(exc) from None

    def invoke(self, ctx: click.Context):
        import os

        from glm_runtime.errors import GLMXError as Failure

        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a command's options and arguments, an unknown command
            raise _exits_1(exc) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            raise stdout_closed() from None
        except Failure as exc:
            raise CommandError(one_line(exc)) from None
        except UnicodeDecodeError as exc:
            raise CommandError(
                f"the input is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 and try again"
            ) from None
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            raise CommandError(f"{exc.strerror or exc}{where}") from None
        except Exception as exc:
            if os.environ.get("GLMX_DEBUG"):
                raise
            raise CommandError(
                f"internal error in glmx ({type(exc).__name__}: {one_line(exc)}); this is a bug: "
                f"please report it with the command (GLMX_DEBUG=1 shows the traceback)"
            ) from None
