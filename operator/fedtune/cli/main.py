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
from contextlib import nullcontext
from functools import wraps
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console

from fedtune.errors import FedtuneError
from fedtune.local.report import BASELINES, Mode

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

SpecFile = Annotated[Path, typer.Argument(help="FederatedFineTune YAML file.")]
RunRoot = Annotated[str, typer.Option("--run-root", envvar="FEDTUNE_RUN_ROOT", help="URL of the run's store.")]
MetricsPort = Annotated[
    int,
    typer.Option("--metrics-port", envvar="FEDTUNE_METRICS_PORT", help="Serve Prometheus metrics here (0: off)."),
]
MetricsAddress = Annotated[
    str,
    typer.Option(
        "--metrics-address", envvar="FEDTUNE_METRICS_ADDRESS", help="Address to serve metrics on (default: all)."
    ),
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
    spec: SpecFile,
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
def baseline(
    spec: SpecFile,
    mode: Annotated[
        Mode,
        typer.Option(
            help="local: one adapter per client on its own data; centralized: one "
            "adapter on all clients' training data pooled."
        ),
    ],
    output: Annotated[
        Path | None, typer.Option(help="Folder for runs (default: spec.storage.uri, ./fedtune-runs).")
    ] = None,
) -> None:
    """Train what the run's data gives without federating, for as many optimizer steps, and write it beside
    the run (<run folder>/baselines/MODE/): `fedtune run` then compares each client's eval loss.

    The federation takes rounds × clientsPerRound × localSteps client steps; centralized takes that many on
    the pooled training splits, local shares them out evenly, one adapter per client on its own split
    (rounds × localSteps each when every client is selected every round). Both score the run's held-out
    examples. Only for data one may pool: both read every client's data
    in this one process.
    """
    _logging()
    from fedtune.api import load_resource
    from fedtune.federation.records import Ledger
    from fedtune.federation.run_config import RunConfig
    from fedtune.local.baseline import Baseline
    from fedtune.local.identities import CONFIG
    from fedtune.local.report import baseline_table
    from fedtune.local.runner import resolve_paths, run_folder, run_root

    resource = load_resource(spec)
    store = run_root(resource, output)
    folder = run_folder(store, output, resource.metadata.name)
    run_spec = resolve_paths(resource.spec, spec.parent)
    summary = Baseline(run_spec).run(mode, folder)
    for client, loss in summary.client_eval_loss.items():
        typer.echo(f"{client}: eval_loss={loss:.4f} (an adapter of {summary.client_steps[client]} steps)")
    typer.echo(f"{summary.steps} optimizer steps; {folder / BASELINES / mode}")
    if (folder / CONFIG).is_dir():  # the federated run is here too: compare
        ledger = Ledger(store, RunConfig.load(folder / CONFIG).trust)
        table = baseline_table(ledger, folder, run_spec) if ledger.final() else None
        if table is not None:
            Console().print(table)


ConfigDir = Annotated[
    Path,
    typer.Option(
        "--config",
        envvar="FEDTUNE_CONFIG",
        help="Folder with resource.json and keys.json: the run's spec and pinned public keys.",
    ),
]
SigningKey = Annotated[
    Path,
    typer.Option("--signing-key", envvar="FEDTUNE_SIGNING_KEY", help="This party's Ed25519 private key (PEM)."),
]


@app.command()
@friendly
def aggregator(
    run_root: RunRoot,
    config: ConfigDir,
    signing_key: SigningKey,
    metrics_port: MetricsPort = 0,
    metrics_address: MetricsAddress = "",
    run_name: RunName = "",
    namespace: Namespace = "",
) -> None:
    """Aggregate rounds until the final adapter is written (the aggregator pod's command)."""
    _logging()
    from fedtune import metrics
    from fedtune.federation.aggregator import Aggregator
    from fedtune.federation.records import Ledger
    from fedtune.federation.run_config import RunConfig
    from fedtune.federation.signing import AGGREGATOR
    from fedtune.storage import open_store

    cfg = RunConfig.load(config)
    signer = cfg.signer(AGGREGATOR, signing_key)
    metrics.serve(metrics_port, metrics_address)
    spec = cfg.resource.spec
    ledger = Ledger(open_store(run_root, endpoint=spec.storage.endpoint), cfg.trust, signer)
    Aggregator(ledger, spec, run=(namespace, run_name), resource=cfg.resource).run()


@app.command()
@friendly
def client(
    run_root: RunRoot,
    config: ConfigDir,
    signing_key: SigningKey,
    name: Annotated[str, typer.Option("--name", envvar="FEDTUNE_CLIENT", help="This client's name in spec.clients.")],
    data_credentials: Annotated[
        Path | None,
        typer.Option(
            "--data-credentials",
            envvar="FEDTUNE_DATA_CREDENTIALS",
            help="Folder with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY files for this client's data.",
        ),
    ] = None,
    metrics_port: MetricsPort = 0,
    metrics_address: MetricsAddress = "",
    run_name: RunName = "",
    namespace: Namespace = "",
) -> None:
    """Train on this silo's data whenever selected (a client pod's command).

    With resources.gpus above 1 it runs itself again under torchrun, one process per GPU.
    """
    _logging()
    from fedtune import metrics
    from fedtune.federation.client import Client
    from fedtune.federation.records import Ledger
    from fedtune.federation.run_config import RunConfig
    from fedtune.storage import open_store
    from fedtune.training import distributed

    cfg = RunConfig.load(config)
    signer = cfg.client_signer(name, signing_key)
    spec = cfg.resource.spec
    index, gpus = next(((i, c.resources.gpus) for i, c in enumerate(spec.clients) if c.name == name), (0, 0))
    if gpus > 1 and not distributed.is_worker():
        distributed.check_devices(gpus, f"spec.clients[{index}].resources.gpus")
        distributed.check_batch(spec.training.batch_size, gpus)
        distributed.relaunch(gpus)
    ledger = Ledger(open_store(run_root, endpoint=spec.storage.endpoint), cfg.trust, signer)
    creds = _credentials(data_credentials) if data_credentials else None
    with distributed.joined() if distributed.is_worker() else nullcontext(distributed.Group()) as group:
        if group.main:
            metrics.serve(metrics_port, metrics_address)
        Client(ledger, spec, name, run=(namespace, run_name), data_credentials=creds, group=group).run()


def _credentials(folder: Path) -> tuple[str, str]:
    """An access key pair from a mounted Secret's files."""
    try:
        return tuple(  # type: ignore[return-value]
            (folder / k).read_text().strip() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        )
    except OSError as e:
        raise FedtuneError(f"--data-credentials {folder}: cannot read {e.filename}: {e.strerror}") from None


@app.command()
@friendly
def keygen(
    name: Annotated[str, typer.Argument(help="Name of the Secret that will hold the private key.")],
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="The Secret's namespace.")] = None,
) -> None:
    """Print a new Ed25519 key pair: a Secret manifest with the private key, and the public key.

    Apply the Secret in the party's namespace, then set the party's `publicKey` to the printed key and
    its `signingKeySecretRef` to NAME.
    """
    import yaml

    from fedtune.api.spec import CREDENTIALS_LABEL
    from fedtune.federation import signing

    key = signing.generate()
    public = signing.encode_public(key.public_key())
    meta: dict[str, object] = {
        "name": name,
        "labels": {CREDENTIALS_LABEL: "true"},
        "annotations": {"fedtune.io/public-key": public},
    }
    if namespace:
        meta["namespace"] = namespace
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "stringData": {signing.KEY_FILE: signing.private_pem(key)},
    }
    typer.echo(f"# publicKey: {public}")
    typer.echo(yaml.safe_dump(secret, sort_keys=False), nl=False)
    err.print(f"publicKey: {public}", markup=False, highlight=False)


@app.command()
@friendly
def join(
    run: Annotated[str, typer.Argument(help="The FederatedFineTune, in the current kubectl context.")],
    client: Annotated[str, typer.Option("--client", help="The external client (spec.clients[].name) to join as.")],
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="The run's namespace.")] = "default",
    silo_namespace: Annotated[
        str | None, typer.Option("--silo-namespace", help="The FederatedClient's namespace (default: the run's).")
    ] = None,
    principal: Annotated[
        str | None, typer.Option(help="The client's storage account, for the bucket policy (default: its name).")
    ] = None,
) -> None:
    """Print what a silo needs to join a run: a FederatedClient to apply in its own cluster (with the run's
    location and the coordinator's public key), and the bucket policy statements its credentials need."""
    import json

    import yaml
    from kubernetes import client as k8s
    from kubernetes import config

    from fedtune.api import API_GROUP, API_VERSION, PLURAL, parse_resource
    from fedtune.controller.builders import run_root
    from fedtune.controller.names import spec_config_map_name
    from fedtune.controller.silo import join_manifest
    from fedtune.federation.policy import bucket_policy
    from fedtune.federation.run_config import KEYS_FILE
    from fedtune.federation.signing import Trust

    config.load_kube_config()
    api = k8s.ApiClient()
    body = k8s.CustomObjectsApi(api).get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, run)
    res = parse_resource({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")}, f"{namespace}/{run}")
    keys = k8s.CoreV1Api(api).read_namespaced_config_map(spec_config_map_name(run), namespace).data or {}
    if KEYS_FILE not in keys:
        raise FedtuneError(f"{namespace}/{run}: its keys are not pinned yet (ConfigMap {spec_config_map_name(run)})")
    trust = Trust.from_json(keys[KEYS_FILE], f"ConfigMap {spec_config_map_name(run)}")
    manifest = join_manifest(res, trust.aggregator, client, run, silo_namespace or namespace)
    policy = bucket_policy(run_root(res), "COORDINATOR-ACCOUNT", {client: principal or client})
    own = [s for s in policy["Statement"] if str(s.get("Sid", "")).startswith("Client")]
    typer.echo("# The silo's storage account needs these statements in the bucket's policy:")
    typer.echo("".join(f"#   {line}\n" for line in json.dumps(own, indent=2).splitlines()), nl=False)
    typer.echo(yaml.safe_dump(manifest, sort_keys=False), nl=False)


@app.command()
@friendly
def verify(
    run_root: Annotated[str, typer.Argument(help="The run's root: a local run folder or s3://bucket/prefix/...")],
    keys: Annotated[
        Path | None,
        typer.Option(help="keys.json with the run's pinned public keys (default: RUN_ROOT/config/keys.json)."),
    ] = None,
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL.")] = None,
) -> None:
    """Check every signature, digest and link of a run; print the final adapter's digest.

    Exits 1 naming the first object that fails.
    """
    from fedtune.federation.records import Ledger
    from fedtune.federation.signing import Trust
    from fedtune.federation.verify import verify_run
    from fedtune.storage import open_store

    store = open_store(run_root, endpoint=endpoint)
    if keys is None:
        from fedtune.storage.local_fs import FileStore

        if not isinstance(store, FileStore):
            raise FedtuneError(f"{run_root}: pass --keys with the run's keys.json (from its spec ConfigMap)")
        keys = store.root / "config" / "keys.json"
    try:
        trust = Trust.from_json(keys.read_text(), str(keys))
    except OSError as e:
        raise FedtuneError(f"--keys {keys}: cannot read: {e.strerror}") from None
    out = verify_run(Ledger(store, trust))
    epochs = sorted(set(out.epochs))
    typer.echo(
        f"{store.uri}: {out.globals} globals, {out.updates} updates, {out.evals} evaluations verified "
        f"(aggregator lease epochs {', '.join(map(str, epochs))})"
    )
    if out.final is None:
        typer.echo(f"running: round {out.globals - 1} is the latest committed global")
    else:
        typer.echo(f"final adapter sha256: {out.final.adapter_sha256}")


@app.command()
@friendly
def policy(
    spec: SpecFile,
    uid: Annotated[
        str | None, typer.Option(help="The resource's uid (kubectl get fft NAME -o jsonpath={.metadata.uid}).")
    ] = None,
    run_root: Annotated[
        str | None, typer.Option(help="The run root, when not on Kubernetes (fedtune run over S3).")
    ] = None,
    principal: Annotated[
        list[str] | None,
        typer.Option(
            help="PARTY=NAME: the storage account of a party (aggregator or a client); default: the party's name."
        ),
    ] = None,
) -> None:
    """Print the S3 bucket policy that confines each party of a run to its own prefix."""
    import json

    from fedtune.api import load_resource
    from fedtune.controller.builders import run_root as k8s_run_root
    from fedtune.federation.policy import bucket_policy

    res = load_resource(spec)
    names = {"aggregator": "aggregator", **{c.name: c.name for c in res.spec.clients}}
    for item in principal or []:
        party, sep, account = item.partition("=")
        if not sep or party not in names:
            raise FedtuneError(f"--principal {item}: expected PARTY=NAME with PARTY one of {', '.join(names)}")
        names[party] = account
    if run_root is None:
        if uid is None and not res.spec.storage.run_root:
            # A wildcard for the uid would also match other runs whose names start with this one's.
            raise FedtuneError(
                "pass --uid (the resource's metadata.uid) or --run-root, or set spec.storage.runRoot: the policy "
                "names one run"
            )
        res.metadata.uid = uid
        run_root = k8s_run_root(res)
    aggregator_account = names.pop("aggregator")
    typer.echo(
        json.dumps(
            bucket_policy(run_root, aggregator_account, names, res.spec.model.uri, res.spec.storage.uri), indent=2
        )
    )


@app.command()
def crd(
    kind: Annotated[
        str, typer.Option(help="FederatedFineTune, or FederatedClient (a client in its owner's cluster).")
    ] = "FederatedFineTune",
) -> None:
    """Print a CustomResourceDefinition of fedtune (what crds/ holds)."""
    from fedtune.api.crd import crd_yaml
    from fedtune.api.fedclient import FEDCLIENT_KIND

    if kind not in ("FederatedFineTune", FEDCLIENT_KIND):
        raise typer.BadParameter(f"{kind}: expected FederatedFineTune or {FEDCLIENT_KIND}", param_hint="--kind")
    typer.echo(crd_yaml(kind), nl=False)


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
    metrics_address: MetricsAddress = "",
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
    os.environ["FEDTUNE_METRICS_ADDRESS"] = metrics_address
    os.environ["FEDTUNE_PEERING_LIFETIME"] = str(peering_lifetime)
    import fedtune.controller.handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=not namespace,
        namespaces=namespace or (),
        standalone=standalone,
        priority=None if standalone else priority,
        peering_name=None if standalone else peering,
    )


from fedtune.cli.model_cmd import app as model_app  # noqa: E402  (it uses friendly, defined above)

app.add_typer(model_app)


def main() -> None:
    app()
