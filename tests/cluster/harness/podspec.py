"""Turning a pod's spec into what a local process needs: environment, files and a command line.

A container's filesystem is a per-pod folder: each volume is materialised as files under
``vol/<name>/`` and each mount path becomes a symlink under ``root/``. The process learns the real
locations through ``FEDTUNE_POD_ROOT`` and ``FEDTUNE_MOUNTS`` (JSON, mount path to real path), and
arguments, environment values and the working directory that start with a mount path are rewritten
to the real path, so ``--config /etc/app/config.yaml`` works unchanged. Mounts under /var/run/secrets,
which client libraries read without being told, are also bound at their real paths in a mount namespace
of the container's own (``in_own_mounts``).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Obj = dict[str, Any]

INHERITED_ENV = (
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "XDG_CACHE_HOME",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "PYTHONPATH",
    "PIP_CACHE_DIR",
    "COVERAGE_PROCESS_START",
)


class ConfigError(Exception):
    """A referenced Secret, ConfigMap or key is missing: the container waits, as a kubelet's would."""


class Lookup:
    """Reads the Secrets, ConfigMaps and tokens a pod refers to, through the API."""

    def secret(self, namespace: str, name: str) -> Obj | None:
        raise NotImplementedError

    def config_map(self, namespace: str, name: str) -> Obj | None:
        raise NotImplementedError

    def token(self, pod: Obj, audience: str | None, expiration: int) -> str:
        raise NotImplementedError


def _secret_data(obj: Obj) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    return data


def _config_map_data(obj: Obj) -> dict[str, bytes]:
    data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


_LABEL_REF = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


def field_ref(pod: Obj, path: str) -> str:
    """The value of a downward-API field path of the pod."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP") or "127.0.0.1",
        "status.hostIP": status.get("hostIP") or "127.0.0.1",
    }
    if path in simple:
        return str(simple[path] or "")
    m = _LABEL_REF.fullmatch(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = (meta.get(path.split(".")[1]) or {}).items()
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items))
    raise ConfigError(f"unsupported fieldRef {path}")


def resource_ref(container: Obj, ref: Obj) -> str:
    """requests.* / limits.* of a container as written in its spec."""
    kind, _, name = ref["resource"].partition(".")
    return str(((container.get("resources") or {}).get(kind) or {}).get(name, "0"))


@dataclass
class Volumes:
    """The volumes of one pod, materialised under its folder."""

    folder: Path

    @property
    def root(self) -> Path:
        return self.folder / "root"

    def materialise(self, pod: Obj, lookup: Lookup, pvc_root: Path) -> None:
        ns = pod["metadata"]["namespace"]
        for vol in pod["spec"].get("volumes") or []:
            target = self.folder / "vol" / vol["name"]
            files: dict[str, tuple[bytes, int | None]] = {}
            if "secret" in vol:
                src = vol["secret"]
                files = self._keyed(lookup.secret(ns, src["secretName"]), _secret_data, src, "Secret")
            elif "configMap" in vol:
                src = vol["configMap"]
                files = self._keyed(lookup.config_map(ns, src["name"]), _config_map_data, src, "ConfigMap")
            elif "downwardAPI" in vol:
                files = self._downward(pod, vol["downwardAPI"].get("items") or [])
            elif "projected" in vol:
                for source in vol["projected"].get("sources") or []:
                    files.update(self._projected(pod, source, lookup))
            elif "hostPath" in vol:
                self._link(target, Path(vol["hostPath"]["path"]))
                continue
            elif "persistentVolumeClaim" in vol:
                claim = pvc_root / ns / vol["persistentVolumeClaim"]["claimName"]
                claim.mkdir(parents=True, exist_ok=True)
                self._link(target, claim)
                continue
            target.mkdir(parents=True, exist_ok=True)
            for rel, (content, mode) in files.items():
                path = target / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(content)
                if mode is not None:
                    os.chmod(tmp, mode)
                tmp.replace(path)

    @staticmethod
    def _link(link: Path, to: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(to)

    @staticmethod
    def _keyed(obj: Obj | None, decode: Any, src: Obj, kind: str) -> dict[str, tuple[bytes, int | None]]:
        if obj is None:
            if src.get("optional"):
                return {}
            raise ConfigError(f'{kind.lower()} "{src.get("secretName") or src.get("name")}" not found')
        data: dict[str, bytes] = decode(obj)
        mode = src.get("defaultMode")
        items = src.get("items")
        if not items:
            return {k: (v, mode) for k, v in data.items()}
        out = {}
        for item in items:
            if item["key"] not in data:
                if src.get("optional"):
                    continue
                raise ConfigError(f"couldn't find key {item['key']} in {kind} {obj['metadata']['name']}")
            out[item["path"]] = (data[item["key"]], item.get("mode", mode))
        return out

    @staticmethod
    def _downward(pod: Obj, items: list[Obj]) -> dict[str, tuple[bytes, int | None]]:
        out: dict[str, tuple[bytes, int | None]] = {}
        for item in items:
            if "fieldRef" in item:
                value = field_ref(pod, item["fieldRef"]["fieldPath"])
            else:
                ref = item["resourceFieldRef"]
                containers = {c["name"]: c for c in pod["spec"]["containers"]}
                value = resource_ref(containers[ref.get("containerName") or pod["spec"]["containers"][0]["name"]], ref)
            out[item["path"]] = (value.encode(), item.get("mode"))
        return out

    def _projected(self, pod: Obj, source: Obj, lookup: Lookup) -> dict[str, tuple[bytes, int | None]]:
        ns = pod["metadata"]["namespace"]
        if "serviceAccountToken" in source:
            src = source["serviceAccountToken"]
            token = lookup.token(pod, src.get("audience"), int(src.get("expirationSeconds") or 3607))
            return {src["path"]: (token.encode(), 0o600)}
        if "secret" in source:
            src = source["secret"]
            return self._keyed(lookup.secret(ns, src["name"]), _secret_data, src, "Secret")
        if "configMap" in source:
            src = source["configMap"]
            return self._keyed(lookup.config_map(ns, src["name"]), _config_map_data, src, "ConfigMap")
        if "downwardAPI" in source:
            return self._downward(pod, source["downwardAPI"].get("items") or [])
        return {}

    def mount(self, container: Obj) -> dict[str, str]:
        """Link each mount path of a container under root/; returns mount path -> real path."""
        mounts: dict[str, str] = {}
        for m in container.get("volumeMounts") or []:
            real = (self.folder / "vol" / m["name"] / m.get("subPath", "")).resolve()
            if not real.exists():
                real.mkdir(parents=True)
            link = self.root / m["mountPath"].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() and os.readlink(link) != str(real):
                link.unlink()
            if not link.is_symlink():
                link.symlink_to(real)
            mounts[m["mountPath"].rstrip("/") or "/"] = str(real)
        return mounts


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known names are replaced, $$ escapes a dollar."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(repl, value)


def rewrite_paths(value: str, mounts: dict[str, str]) -> str:
    """Map a container path (alone or after ``--flag=``) that lies under a mount to the real path."""
    prefix, eq, rest = value.partition("=") if value.startswith("-") else ("", "", value)
    for mount_path in sorted(mounts, key=len, reverse=True):
        if rest == mount_path or rest.startswith(mount_path.rstrip("/") + "/"):
            return prefix + eq + mounts[mount_path] + rest[len(mount_path) :]
    return value


def container_env(
    pod: Obj, container: Obj, lookup: Lookup, base: dict[str, str], mounts: dict[str, str]
) -> dict[str, str]:
    """The process environment: inherited basics, then envFrom, then env in order (with $(VAR))."""
    ns = pod["metadata"]["namespace"]
    env = dict(base)
    declared: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "secretRef" in src:
            ref = src["secretRef"]
            obj = lookup.secret(ns, ref["name"])
            data = _secret_data(obj) if obj else {}
        else:
            ref = src["configMapRef"]
            obj = lookup.config_map(ns, ref["name"])
            data = _config_map_data(obj) if obj else {}
        if obj is None and not ref.get("optional"):
            raise ConfigError(f'{"secret" if "secretRef" in src else "configmap"} "{ref["name"]}" not found')
        declared.update({prefix + k: v.decode() for k, v in data.items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            declared[name] = expand(item.get("value", ""), {**env, **declared})
            continue
        src = item["valueFrom"]
        if "fieldRef" in src:
            declared[name] = field_ref(pod, src["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in src:
            declared[name] = resource_ref(container, src["resourceFieldRef"])
        else:
            kind = "secretKeyRef" if "secretKeyRef" in src else "configMapKeyRef"
            ref = src[kind]
            obj = lookup.secret(ns, ref["name"]) if kind == "secretKeyRef" else lookup.config_map(ns, ref["name"])
            data = (_secret_data(obj) if kind == "secretKeyRef" else _config_map_data(obj)) if obj else {}
            if ref["key"] in data:
                declared[name] = data[ref["key"]].decode()
            elif not ref.get("optional"):
                what = "secret" if kind == "secretKeyRef" else "configmap"
                raise ConfigError(f'couldn\'t find key {ref["key"]} in {what} "{ns}/{ref["name"]}"')
    env.update({k: rewrite_paths(v, mounts) for k, v in declared.items()})
    return env


def command_line(container: Obj, env: dict[str, str], mounts: dict[str, str]) -> list[str]:
    """command + args with $(VAR) expansion and mount paths rewritten; the image has no entrypoint here."""
    argv = [expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
    if not argv:
        raise ConfigError("container has no command: images are not run here, so command is required")
    return [rewrite_paths(a, mounts) for a in argv]


# Where client libraries look for a pod's credentials without being told (the in-cluster config of the
# Kubernetes clients): mounts under it must be at their real paths, not only rewritten in args and env.
SECRETS = "/var/run/secrets"
# In the new mount namespace: an empty tmpfs over SECRETS (nothing of the host's shows, nothing is created
# on the host), then each mount bound at its path (a file onto a file, a folder onto a folder), then the
# container's command in place of the shell.
_BIND = (
    'mount -t tmpfs -o mode=0755 tmpfs "$0" || exit 1; '
    'while [ "$1" != -- ]; do '
    'if [ -d "$2" ]; then mkdir -p "$1"; else mkdir -p "$(dirname "$1")" && : > "$1"; fi && '
    'mount --bind "$2" "$1" || { echo "cannot mount $2 at $1" >&2; exit 1; }; shift 2; done; '
    'shift; exec "$@"'
)


@functools.cache
def unshare_command() -> str | None:
    """unshare(1), where it can make a mount namespace here (root with CAP_SYS_ADMIN); else None."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return None
    done = subprocess.run([unshare, "--mount", "--propagation", "private", "true"], capture_output=True)
    return unshare if done.returncode == 0 else None


def in_own_mounts(argv: list[str], mounts: dict[str, str]) -> list[str]:
    """argv run in a mount namespace of its own where each mount under SECRETS is bound at its mount path,
    as a container sees it; other pods keep theirs. Where no mount namespace can be made, argv as it is."""
    binds = {m: real for m, real in mounts.items() if m == SECRETS or m.startswith(SECRETS + "/")}
    unshare = unshare_command() if binds else None
    if unshare is None:
        return argv
    Path(SECRETS).mkdir(parents=True, exist_ok=True)  # the tmpfs needs a place to go; it stays empty
    pairs = [x for m, real in sorted(binds.items()) for x in (m, real)]
    return [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", _BIND, SECRETS, *pairs, "--", *argv]


def mounts_env(root: Path, folder: Path, mounts: dict[str, str]) -> dict[str, str]:
    return {
        "FEDTUNE_POD_DIR": str(folder),
        "FEDTUNE_POD_ROOT": str(root),
        "FEDTUNE_MOUNTS": json.dumps(mounts, sort_keys=True),
    }
