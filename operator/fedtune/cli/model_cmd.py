"""`fedtune model push`: put a base model where every party of a run can fetch it (spec.model.uri)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedtune.cli.main import friendly

app = typer.Typer(name="model", help="Base models in an object store, for spec.model.uri.", no_args_is_help=True)


@app.command()
@friendly
def push(
    folder: Annotated[Path, typer.Argument(help="Folder saved with save_pretrained (model and tokenizer).")],
    uri: Annotated[str, typer.Argument(help="Object-store prefix: s3://bucket/models/NAME/ or file://...")],
    endpoint: Annotated[
        str | None, typer.Option(envvar="FEDTUNE_S3_ENDPOINT", help="S3 endpoint URL (spec.storage.endpoint).")
    ] = None,
    region: Annotated[str | None, typer.Option(help="S3 region (spec.storage.region).")] = None,
) -> None:
    """Upload FOLDER's files to URI, then the manifest of their digests; print the manifest's sha256.

    Set spec.model.uri to URI and spec.model.sha256 to the printed digest: each party checks every file
    against it before loading.
    """
    from fedtune.storage import open_store
    from fedtune.training.model_store import push as push_model

    typer.echo(push_model(folder, open_store(uri, endpoint=endpoint, region=region)))
