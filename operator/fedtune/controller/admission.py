"""What keeps a run's pods from being created: an image the operator may not run, Secrets that are missing,
belong to another run or lack keys, a public key that does not match its private half."""

from __future__ import annotations

import fnmatch
import os
from typing import Any

from fedtune.api.spec import CREDENTIALS_LABEL, FederatedFineTune
from fedtune.controller.gang import too_many_shapes
from fedtune.controller.kube import Credentials
from fedtune.federation.signing import KEY_FILE, InvalidKey, check_pair, parse_private

STORAGE_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
TOKEN_KEY = "HF_TOKEN"


def needed_keys(path: str) -> tuple[str, ...]:
    """The keys the Secret a field names must hold."""
    if path.endswith("signingKeySecretRef"):
        return (KEY_FILE,)
    if path.endswith(("tokenSecretRef", "TokenSecretRef")):
        return (TOKEN_KEY,)
    return STORAGE_KEYS


def allowed_images() -> list[str]:
    """Image patterns the chart allows (values.allowedImages); empty allows any."""
    return os.environ.get("FEDTUNE_ALLOWED_IMAGES", "").replace(",", " ").split()


# The volume kinds a model (or its download cache) may live on: storage, not credentials. Any other kind
# (secret, projected, configMap, downwardAPI, or a driver given a Secret) could mount objects past the
# credentials label. hostPath stays for single-node and test clusters; restricted Pod Security refuses it.
MODEL_VOLUMES = ("persistentVolumeClaim", "ephemeral", "emptyDir", "nfs", "image", "csi", "hostPath")
SECRETS_STORE_DRIVER = "secrets-store.csi.k8s.io"


def model_volume_problem(source: dict[str, Any]) -> str | None:
    """Why a volume source cannot hold the model, or None."""
    kinds = [k for k in source if k != "name"]
    if len(kinds) != 1 or kinds[0] not in MODEL_VOLUMES:
        return f"a {'/'.join(kinds) or 'empty'} volume cannot hold the model (allowed: {', '.join(MODEL_VOLUMES)})"
    csi = source.get("csi") or {}
    if "nodePublishSecretRef" in csi or csi.get("driver") == SECRETS_STORE_DRIVER:
        return "a csi volume that reads Secrets cannot hold the model"
    return None


def credential_volume(res: FederatedFineTune) -> tuple[str, str] | None:
    """(field, why) for a model volume that could mount credentials or cluster objects, or None."""
    m = res.spec.model
    for field, source in (("spec.model.volume", m.volume), ("spec.model.cache", m.cache)):
        problem = model_volume_problem(source) if source is not None else None
        if problem:
            return field, problem
    return None


def secrets_problem(
    refs: list[tuple[str, str]], namespace: str, uid: str | None, secrets: dict[str, Credentials]
) -> tuple[str, str] | None:
    """(reason, message) for the first Secret a field names (path, name) that is missing, another run's
    generated key, or without the keys the field needs; None if all can be used by the object of `uid`."""
    for path, name in refs:
        found = secrets.get(name)
        if found is None:
            return "SecretNotFound", (
                f"{path}: Secret {namespace}/{name} not found, or not labelled {CREDENTIALS_LABEL} (the operator "
                f"reads only labelled Secrets: kubectl label secret {name} {CREDENTIALS_LABEL}=true)"
            )
        if found.runs and uid not in found.runs:
            return "SecretNotAllowed", f"{path}: Secret {namespace}/{name} belongs to another run (its generated key)"
        need = needed_keys(path)
        if not set(need) <= set(found.data):
            return "SecretInvalid", f"{path}: Secret {namespace}/{name} needs keys {' and '.join(need)}"
    return None


def image_problem(image: str) -> tuple[str, str] | None:
    """(reason, message) when the operator may not run this image (spec.image of a run or a client)."""
    allowed = allowed_images()
    if allowed and not any(fnmatch.fnmatchcase(image, pat) for pat in allowed):
        return (
            "ImageNotAllowed",
            f"spec.image: {image} is not among the operator's allowedImages ({', '.join(allowed)})",
        )
    return None


def admission(res: FederatedFineTune, secrets: dict[str, Credentials]) -> tuple[str, str] | None:
    """What keeps this run's pods from being created, as (reason, message naming the field), or None."""
    spec, ns = res.spec, res.metadata.namespace
    if found_image := image_problem(spec.image):
        return found_image
    if spec.queue_name and (shapes := too_many_shapes(res)):
        return "TooManyPodSets", shapes
    found_volume = credential_volume(res)
    if found_volume:
        field, problem = found_volume
        return "VolumeNotAllowed", f"{field}: {problem}: it could mount objects past the {CREDENTIALS_LABEL} label"
    if found_secret := secrets_problem(spec.secret_refs(), ns, res.metadata.uid, secrets):
        return found_secret
    for path, party in spec.parties():
        if party.public_key and party.signing_key_secret_ref:
            pem = secrets[party.signing_key_secret_ref].data[KEY_FILE]
            try:
                check_pair(
                    parse_private(pem, f"{path}.signingKeySecretRef"),
                    party.public_key,
                    f"{path}.publicKey",
                    f"Secret {ns}/{party.signing_key_secret_ref}",
                )
            except InvalidKey as e:
                return "KeyMismatch", str(e)
    return None
