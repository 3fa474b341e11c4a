"""The `spafl` command line: run, resume, report, keys, presets, fetch-data, deploy-local."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

from spafl import __version__
from spafl.errors import DivergedError, UserError, file_error, short_path


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line with exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _overrides(assignments: list[str] | None, data_dir: str | None) -> dict[str, str]:
    from spafl.config import parse_assignment

    values = dict(parse_assignment(text) for text in assignments or [])
    if data_dir is not None:
        values["data_dir"] = data_dir
    return values


def _interruptible() -> None:
    """Let Ctrl-C (SIGINT) stop this command even when it was started with SIGINT ignored.

    A background job of a non-interactive shell, and some CI runners, start
    processes with SIGINT ignored, and Python then leaves it ignored: Ctrl-C
    and ``kill -INT`` did nothing. A run stopped by SIGINT keeps its last
    checkpoint and resumes, so Python's default handler is put back.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def cmd_run(args: argparse.Namespace) -> int:
    from spafl.config import build_config, config_from_dict
    from spafl.engine import Simulator
    from spafl.runtime.record import CONFIG, check_writable_dir, claim_run_dir, read_run_config, write_run_config
    from spafl.report import format_summary

    _interruptible()
    if args.resume:
        if args.preset or args.config or args.set or args.out or args.data_dir:
            raise UserError("--resume DIR takes no other options: the run continues with the config saved in DIR")
        run_dir = Path(args.resume)
        saved = read_run_config(run_dir)
        try:
            config = config_from_dict(saved)
        except UserError as error:
            raise UserError(f"{short_path(run_dir / CONFIG)}: {error}") from None
        check_writable_dir(run_dir, "run directory")
    else:
        if args.out is None:
            raise UserError("spafl run needs --out DIR (or --resume DIR to continue a run)")
        run_dir = Path(args.out)
        check_writable_dir(run_dir, "--out")
        claim_run_dir(run_dir, f"continue it with `spafl run --resume {run_dir}` or pick another --out")
        config = build_config(args.preset, args.config, _overrides(args.set, args.data_dir))
    simulator = Simulator(config, run_dir, progress=not args.quiet)
    if not args.resume:
        try:
            write_run_config(run_dir, config, args.preset, simulator.provenance())
        except OSError as error:
            raise file_error(error, f"cannot write {short_path(run_dir / CONFIG)}") from None
    try:
        summary = simulator.run(resume=bool(args.resume))
    except KeyboardInterrupt:
        print(f"\nspafl: interrupted; continue with `spafl run --resume {run_dir}`", file=sys.stderr)
        return 130
    print(format_summary(run_dir, summary))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from spafl.report import plot_patterns, report

    print(report(args.runs))
    print(f"plots written: accuracy.png, density.png, communication.png in {', '.join(args.runs)}")
    if args.patterns:
        for run_dir in args.runs:
            print(f"sparsity patterns: {plot_patterns(run_dir, args.patterns)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from spafl.compare import TABLE_HEADER, compare, redraw

    if args.from_dir is not None:
        given = [name for name in ("preset", "out", "seeds", "config", "data_dir", "set") if getattr(args, name)]
        if given:
            raise UserError(f"--from draws finished runs again and takes only --methods; drop --{given[0].replace('_', '-')}")
        redraw(args.from_dir, args.methods)
        print((Path(args.from_dir) / "table.md").read_text())
        print(f"written: {args.from_dir}/table.csv, table.md, accuracy.png, communication.png, density.png")
        return 0
    if args.methods is None or args.out is None:
        raise UserError("compare needs --methods and --out (or --from DIR to draw finished runs again)")
    _interruptible()
    try:
        compare(args.preset, args.methods, args.out, args.seeds, _overrides(args.set, args.data_dir), args.config,
                progress=not args.quiet, log=lambda line: print(line, file=sys.stderr))
    except KeyboardInterrupt:
        print("\nspafl: interrupted; run the same command again to resume the unfinished runs", file=sys.stderr)
        return 130
    print((Path(args.out) / "table.md").read_text())
    print(f"written: {args.out}/table.csv ({', '.join(TABLE_HEADER[:3])}, ...), table.md, accuracy.png, communication.png, density.png")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from spafl.config import describe_keys

    if args.method is None:
        print(describe_keys())
        return 0
    from spafl.algorithms import ALGORITHMS

    if args.method not in ALGORITHMS:
        raise UserError(f"unknown method {args.method!r}; methods: {', '.join(ALGORITHMS)}")
    print(describe_keys(ALGORITHMS[args.method].keys()))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from spafl.config import METHOD_SETTINGS, PRESETS, build_config

    for name in PRESETS:
        config = build_config(name)
        print(f"{name}: {config.model} on {config.dataset}, {config.num_clients} clients ({config.clients_per_round}/round), "
              f"{config.rounds} rounds, E={config.local_epochs}, batch {config.batch_size}, lr {config.lr}, th_coeff {config.th_coeff}")
        for method, settings in METHOD_SETTINGS.get(name, {}).items():
            print(f"  with method={method}: " + ", ".join(f"{key} {value}" for key, value in settings.items()))
        if args.verbose:
            print("  " + json.dumps(config.to_dict()))
    return 0


def cmd_fetch_data(args: argparse.Namespace) -> int:
    from spafl.data import fetch

    location = fetch(args.dataset, args.data_dir)
    print(f"{args.dataset}: {location}")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from spafl.flower.deploy import DeployError, InterruptGuard, deploy_local

    def say(line: str) -> None:
        if not args.quiet or line.startswith("warning:"):
            print(f"deploy-local: {line}", file=sys.stderr, flush=True)

    def on_line(line: str) -> None:
        print(f"  | {line}", file=sys.stderr, flush=True)

    # SIGINT (also when started with it ignored), SIGTERM and SIGHUP (unless nohup) raise one KeyboardInterrupt;
    # deploy_local stops every process it started before the exception leaves it.
    with InterruptGuard():
        try:
            summary = deploy_local(
                args.out, args.nodes, rounds=args.rounds, preset=args.preset, assignments=_overrides(args.set, None),
                tls=args.tls, auth=args.auth, round_timeout=args.round_timeout, data_dir=args.data_dir,
                timeout=args.timeout, log=say, on_line=None if args.quiet else on_line,
            )
            # spafl.report imports torch: only now, for the summary table
            from spafl.report import format_summary

            print(format_summary(args.out, summary))
        except KeyboardInterrupt:
            print(f"\nspafl: deploy-local interrupted; its Flower processes were stopped (logs in {args.out}/logs)",
                  file=sys.stderr, flush=True)
            return 130
        except DeployError as error:
            print(f"spafl: deploy-local failed: {error}", file=sys.stderr)
            return 1
    print(f"logs: {args.out}/logs (superlink.log, supernode-<i>.log, serverapp.log, flwr-cli.log)")
    return 0


def _seconds(text: str) -> float:
    """A number of seconds > 0 (finite), for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spafl", description="SpaFL: federated learning with trainable structured-sparsity thresholds.")
    parser.add_argument("--version", action="version", version=f"spafl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run (or resume) an experiment")
    run.add_argument("--preset", help="named settings; see `spafl presets`")
    run.add_argument("--out", help="run directory to create")
    run.add_argument("--config", help="TOML file of flat config keys")
    run.add_argument("--data-dir", help="directory holding the dataset files (authoritative)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    run.add_argument(
        "--resume", metavar="DIR",
        help="continue an interrupted run from its last checkpoint, with the settings in DIR/config.json; they must match "
        "the checkpoint's, except rounds, which may be raised to extend a run (or lowered, down to the checkpoint's round)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.set_defaults(handler=cmd_run)

    rep = commands.add_parser("report", help="summary table and plots of run directories")
    rep.add_argument("runs", nargs="+", metavar="DIR")
    rep.add_argument("--patterns", metavar="LAYER", help="also draw kept/pruned units of LAYER per client at the rounds in record_masks")
    rep.set_defaults(handler=cmd_report)

    cmp_ = commands.add_parser("compare", help="run several methods on one partition and sampling sequence; tables and figures")
    cmp_.add_argument("--preset", help="named settings; see `spafl presets`")
    cmp_.add_argument("--methods", help="comma-separated: spafl,fedavg,local,spafl:key=value[:key=value]")
    cmp_.add_argument("--out", help="directory for the runs, table.csv, table.md and figures")
    cmp_.add_argument("--from", dest="from_dir", metavar="DIR",
                      help="draw table and figures again from the finished runs under DIR (DIR/<method>/seed<S>); trains nothing")
    cmp_.add_argument("--seeds", help="comma-separated seeds (default: the config's seed)")
    cmp_.add_argument("--config", help="TOML file of flat config keys")
    cmp_.add_argument("--data-dir", help="directory holding the dataset files (authoritative)")
    cmp_.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key for every method")
    cmp_.add_argument("--quiet", action="store_true", help="no progress display")
    cmp_.set_defaults(handler=cmd_compare)

    keys = commands.add_parser("keys", help="list every config key by owner, with its default and allowed values")
    keys.add_argument("--method", help="only the keys this method reads")
    keys.set_defaults(handler=cmd_keys)

    presets = commands.add_parser("presets", help="list the presets")
    presets.add_argument("--verbose", action="store_true")
    presets.set_defaults(handler=cmd_presets)

    fetch = commands.add_parser("fetch-data", help="find or download a dataset and print where it is")
    fetch.add_argument("dataset", choices=("fmnist", "cifar10", "cifar100"))
    fetch.add_argument("--data-dir", help="look only here")
    fetch.set_defaults(handler=cmd_fetch_data)

    deploy = commands.add_parser(
        "deploy-local", help="run the Flower app on a local SuperLink and N SuperNodes (127.0.0.1)",
        description="Start a Flower SuperLink and N SuperNodes on 127.0.0.1 (one client per SuperNode), run the "
        "spafl Flower app with `flwr run`, write metrics.jsonl/summary.json to DIR, stop every process.",
    )
    deploy.add_argument("--nodes", type=int, required=True, metavar="N", help="SuperNodes to start (= num_clients)")
    deploy.add_argument("--out", required=True, metavar="DIR", help="run directory (metrics, logs/, nodes/, .flower/)")
    deploy.add_argument("--rounds", type=int, metavar="R", help="communication rounds (default: the preset's)")
    deploy.add_argument("--preset", help="named settings; see `spafl presets`")
    deploy.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    deploy.add_argument("--tls", action="store_true", help="TLS everywhere, with a generated CA and server certificate")
    deploy.add_argument("--auth", action="store_true", help="SuperNode authentication with generated, registered keys (implies --tls)")
    deploy.add_argument("--round-timeout", type=_seconds, metavar="S", help="seconds the server waits for replies (default: the app's, 120)")
    deploy.add_argument("--data-dir", help="dataset directory for every SuperNode (node config data-dir)")
    deploy.add_argument("--timeout", type=_seconds, metavar="S", help="give up (and stop everything) after S seconds of run time")
    deploy.add_argument("--quiet", action="store_true", help="no progress on stderr")
    deploy.set_defaults(handler=cmd_deploy_local)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UserError as error:
        print(f"spafl: error: {error}", file=sys.stderr)
        return 2
    except DivergedError as error:
        print(f"spafl: diverged: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # whoever read the output stopped (`spafl presets | head -1`): stop as a Unix filter does, without a
        # traceback; stdout goes to /dev/null so that the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
