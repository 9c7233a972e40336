"""`fedtune run / validate / aggregator / client`: thin commands over the library.

Every FedtuneError ends the command with one `error: ...` line on stderr and exit code 1, never a
traceback: users act on the message, and supervisors (the local runner, Kubernetes) read it from logs.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console

from fedtune.errors import FedtuneError

app = typer.Typer(
    name="fedtune",
    help="Federated fine-tuning of LLMs: on Kubernetes, or on this machine with `fedtune run`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")

RunRoot = Annotated[str, typer.Option("--run-root", envvar="FEDTUNE_RUN_ROOT", help="URL of the run's store.")]
MetricsPort = Annotated[
    int,
    typer.Option("--metrics-port", envvar="FEDTUNE_METRICS_PORT", help="Serve Prometheus metrics here (0: off)."),
]
RunName = Annotated[str, typer.Option("--run-name", envvar="FEDTUNE_RUN_NAME", help="Run name for metric labels.")]
Namespace = Annotated[str, typer.Option("--namespace", envvar="FEDTUNE_NAMESPACE", help="Namespace for metric labels.")]


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn FedtuneError into one line and exit 1; Ctrl-C into exit 130."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except FedtuneError as e:
            err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


def _logging() -> None:
    # Library deprecation notices are for fedtune's developers, not for the people reading pod logs.
    warnings.filterwarnings("ignore", category=FutureWarning)
    level = os.environ.get("FEDTUNE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)


@app.command()
@friendly
def validate(files: Annotated[list[Path], typer.Argument(help="FederatedFineTune YAML files.")]) -> None:
    """Check run specs; print every problem with its field path. Exit 1 if any is invalid."""
    from fedtune.api import SpecError, load_resource

    bad = 0
    for f in files:
        try:
            load_resource(f)
            typer.echo(f"{f}: valid")
        except SpecError as e:
            bad += 1
            for problem in e.problems:
                err.print(f"{f}: {problem}", markup=False, highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)


@app.command()
@friendly
def run(
    spec: Annotated[Path, typer.Argument(help="FederatedFineTune YAML file.")],
    output: Annotated[
        Path | None, typer.Option(help="Folder for runs (default: spec.storage.uri, ./fedtune-runs).")
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Delete this run's local folder first instead of resuming.")] = False,
    live: Annotated[bool, typer.Option(help="Redraw progress in place on a terminal.")] = True,
) -> None:
    """Run a whole federation on this machine: aggregator and clients as local processes."""
    from fedtune.local.runner import LocalRun

    LocalRun(spec, output=output, fresh=fresh).run(live=live)


@app.command()
@friendly
def aggregator(
    run_root: RunRoot,
    spec: Annotated[Path | None, typer.Option(help="Spec to publish if the run root has none yet.")] = None,
    metrics_port: MetricsPort = 0,
    run_name: RunName = "",
    namespace: Namespace = "",
) -> None:
    """Aggregate rounds until the final adapter is written (the aggregator pod's command)."""
    _logging()
    from fedtune import metrics
    from fedtune.api import load_resource
    from fedtune.federation.aggregator import Aggregator
    from fedtune.storage import open_store

    resource = load_resource(spec) if spec else None
    metrics.serve(metrics_port)
    store = open_store(run_root, endpoint=resource.spec.storage.endpoint if resource else None)
    Aggregator(store, resource.spec if resource else None, run=(namespace, run_name)).run()


@app.command()
@friendly
def client(
    run_root: RunRoot,
    name: Annotated[str, typer.Option("--name", envvar="FEDTUNE_CLIENT", help="This client's name in spec.clients.")],
    metrics_port: MetricsPort = 0,
    run_name: RunName = "",
    namespace: Namespace = "",
) -> None:
    """Train on this silo's data whenever selected (a client pod's command)."""
    _logging()
    from fedtune import metrics
    from fedtune.federation.client import Client
    from fedtune.storage import open_store

    metrics.serve(metrics_port)
    Client(open_store(run_root), name, run=(namespace, run_name)).run()


@app.command()
def crd() -> None:
    """Print the FederatedFineTune CustomResourceDefinition (what crds/ holds)."""
    from fedtune.api.crd import crd_yaml

    typer.echo(crd_yaml(), nl=False)


@app.command()
@friendly
def operator(
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Watch these namespaces (default: all).")
    ] = None,
    priority: Annotated[int, typer.Option(help="Peering priority; the highest-priority replica acts.")] = 0,
    peering: Annotated[str, typer.Option(help="Peering object shared by the replicas of one operator.")] = "fedtune",
    standalone: Annotated[bool, typer.Option(help="No peering: for a single replica.")] = False,
    peering_lifetime: Annotated[
        int, typer.Option(help="Seconds after which a silent replica counts as gone and another takes over.")
    ] = 60,
    metrics_port: MetricsPort = 0,
) -> None:
    """Run the operator: reconcile FederatedFineTune resources into Jobs (the operator pod's command)."""
    _logging()
    import kopf
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    os.environ["FEDTUNE_METRICS_PORT"] = str(metrics_port)
    os.environ["FEDTUNE_PEERING_LIFETIME"] = str(peering_lifetime)
    import fedtune.controller.handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=not namespace,
        namespaces=namespace or (),
        standalone=standalone,
        priority=None if standalone else priority,
        peering_name=None if standalone else peering,
    )


def main() -> None:
    app()
