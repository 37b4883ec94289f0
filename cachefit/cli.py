"""The ``cachefit`` command: parses arguments and calls the library (tvmc-style subcommands)."""

from __future__ import annotations

import functools
import logging
import sys

import click

from .errors import CachefitError


def user_errors(fn):
    """Turn cachefit's own errors into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CachefitError as exc:
            click.echo(f"cachefit: error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="cachefit")
def main(verbose: int) -> None:
    """cachefit: split a model into per-device stages that run out of on-chip memory."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":  # pragma: no cover
    main()
