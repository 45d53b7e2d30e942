"""``persistworld study {create,serve,report}`` (argparse; see ``persistworld.study``)."""
from __future__ import annotations

import argparse

from persistworld.study.create import add_create_arguments, create_main
from persistworld.study.report import add_report_arguments, report_main
from persistworld.study.server import add_serve_arguments, serve_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="persistworld study",
                                 description="the human 2AFC preference study (paper App. D)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, add, run, text in (
            ("create", add_create_arguments, create_main,
             "pairs, WebM videos, rater assignment and tokens from evaluated runs"),
            ("serve", add_serve_arguments, serve_main,
             "the web app (127.0.0.1 by default); votes into the study's database"),
            ("report", add_report_arguments, report_main,
             "win rates, binomial tests, Elo, Bradley-Terry, kappa, consistency, position bias")):
        p = sub.add_parser(name, help=text, description=text)
        add(p)
        p.set_defaults(handler=run)
    args = ap.parse_args(argv)
    return args.handler(args)
