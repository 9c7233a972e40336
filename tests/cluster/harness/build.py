"""Fetch and build the cluster's binaries from the Go module proxy, cached by version.

Every binary lives under ``<cache>/bin/<component>-<version>/``; a component whose folder exists is
never rebuilt, so a second run builds nothing. Builds go to a temporary folder that is renamed into
place only when complete, under a file lock, so an interrupted or concurrent run never leaves a half
cache behind. Debian tools (kubectl, promtool) come from apt where the machine lacks them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

GO = os.environ.get("FEDTUNE_GO", "/usr/local/go/bin/go")
GOPROXY = os.environ.get("GOPROXY", "https://proxy.golang.org,direct")

KUBERNETES_VERSION = "v1.37.2"
ETCD_VERSION = "v3.7.3"
HELM_VERSION = "v3.22.0"
VERSITYGW_VERSION = "v1.8.0"
KUEUE_VERSION = "v0.17.0"
# Prometheus 3.x's Go module: Debian's prometheus is built without Kubernetes service discovery.
PROMETHEUS_VERSION = "v0.316.0"


def cache_root() -> Path:
    """The per-user cache folder that keeps binaries and Go caches between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedtune"


@dataclass
class Component:
    """One Go build: a temporary module, the packages to build and the binaries it yields."""

    name: str
    version: str
    go_mod: str
    packages: list[str]
    binaries: list[str]
    ldflags: str = ""
    tags: str = ""
    files: dict[str, str] = field(default_factory=dict)
    assets: list[tuple[str, str, str]] = field(default_factory=list)
    """Folders copied out of a required module's source: ``(module, folder in it, destination)``."""

    @property
    def folder(self) -> Path:
        return cache_root() / "bin" / f"{self.name}-{self.version}"

    def cached(self) -> bool:
        return all((self.folder / b).is_file() for b in self.binaries)


def _go_mod(name: str, module: str, version: str) -> str:
    """A build module requiring one module at one version."""
    return f"module fedtune.local/{name}\n\ngo 1.26\n\nrequire {module} {version}\n"


def _staging_modules(version: str) -> list[str]:
    """The k8s.io staging modules that k8s.io/kubernetes requires at v0.0.0 (needing a replace)."""
    cached = cache_root() / "go" / f"kubernetes-{version}.mod"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        proxy = GOPROXY.split(",")[0]
        with urllib.request.urlopen(f"{proxy}/k8s.io/kubernetes/@v/{version}.mod", timeout=60) as r:
            cached.write_bytes(r.read())
    mods = []
    for line in cached.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("k8s.io/") and parts[1] == "v0.0.0":
            mods.append(parts[0])
    return sorted(set(mods))


def kubernetes() -> Component:
    """kube-apiserver, kube-controller-manager and kube-scheduler of one release."""
    v = KUBERNETES_VERSION
    staging = "v0." + v.split(".", 1)[1]
    major, minor = v[1:].split(".")[:2]
    replaces = "\n".join(f"\t{m} => {m} {staging}" for m in _staging_modules(v))
    go_mod = _go_mod("kubernetes", "k8s.io/kubernetes", v)
    go_mod += f"\nreplace (\n{replaces}\n)\n"
    ver = "k8s.io/component-base/version"
    ldflags = (
        f"-X {ver}.gitVersion={v} -X {ver}.gitMajor={major} -X {ver}.gitMinor={minor} "
        f"-X {ver}.gitTreeState=clean -X {ver}.buildDate=1970-01-01T00:00:00Z"
    )
    bins = ["kube-apiserver", "kube-controller-manager", "kube-scheduler"]
    return Component("kubernetes", v, go_mod, [f"k8s.io/kubernetes/cmd/{b}" for b in bins], bins, ldflags)


def etcd() -> Component:
    """etcd, from the server module's own entry point."""
    main = 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
    main += "func main() { etcdmain.Main(os.Args) }\n"
    go_mod = _go_mod("etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION)
    return Component("etcd", ETCD_VERSION, go_mod, ["./cmd/etcd"], ["etcd"], files={"cmd/etcd/main.go": main})


def helm() -> Component:
    """helm, with its version stamped as a release build does."""
    go_mod = _go_mod("helm", "helm.sh/helm/v3", HELM_VERSION)
    ldflags = f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"
    return Component("helm", HELM_VERSION, go_mod, ["helm.sh/helm/v3/cmd/helm"], ["helm"], ldflags)


def versitygw() -> Component:
    """versitygw: an S3 gateway whose posix backend keeps objects as plain files on disk."""
    go_mod = _go_mod("versitygw", "github.com/versity/versitygw", VERSITYGW_VERSION)
    return Component(
        "versitygw", VERSITYGW_VERSION, go_mod, ["github.com/versity/versitygw/cmd/versitygw"], ["versitygw"]
    )


def kueue() -> Component:
    """Kueue's manager, with the CRDs of the same release copied beside it."""
    go_mod = _go_mod("kueue", "sigs.k8s.io/kueue", KUEUE_VERSION)
    crds = [("sigs.k8s.io/kueue", "config/components/crd/bases", "crds")]
    return Component("kueue", KUEUE_VERSION, go_mod, ["sigs.k8s.io/kueue/cmd/kueue"], ["kueue"], assets=crds)


def prometheus() -> Component:
    """Prometheus with Kubernetes service discovery (and no other: the cloud ones would triple the build), to
    scrape what the chart's monitors select."""
    go_mod = _go_mod("prometheus", "github.com/prometheus/prometheus", PROMETHEUS_VERSION)
    package = "github.com/prometheus/prometheus/cmd/prometheus"
    tags = "remove_all_sd,enable_kubernetes_sd"
    return Component("prometheus", PROMETHEUS_VERSION, go_mod, [package], ["prometheus"], tags=tags)


def components() -> list[Component]:
    return [kubernetes(), etcd(), versitygw(), helm(), kueue(), prometheus()]


def go_env() -> dict[str, str]:
    """Go caches under the project's cache folder; the machine's own Go toolchain only."""
    root = cache_root() / "go"
    env = dict(os.environ)
    env.update(
        GOMODCACHE=str(root / "mod"),
        GOCACHE=str(root / "build"),
        GOPATH=str(root / "path"),
        GOFLAGS="-mod=mod -buildvcs=false -modcacherw",
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
        GOPROXY=GOPROXY,
    )
    return env


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    path = cache_root() / "build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _go(args: list[str], cwd: Path, log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ go {' '.join(args)}\n")
        out.flush()
        rc = subprocess.run([GO, *args], cwd=cwd, env=go_env(), stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"go {' '.join(args)} failed (log {log}):\n{tail}")


def _module_dir(mod: Path, module: str) -> Path:
    """Where a module required by the build module lies in the module cache."""
    found = subprocess.run(
        [GO, "list", "-m", "-f", "{{.Dir}}", module], cwd=mod, env=go_env(), capture_output=True, text=True, check=True
    )
    return Path(found.stdout.strip())


def build(c: Component) -> float:
    """Build one component unless cached; returns seconds spent (0 when cached)."""
    if c.cached():
        return 0.0
    start = time.monotonic()
    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{c.name}-{c.version}.log"
    log.write_text("")
    c.folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"build-{c.name}-", dir=c.folder.parent) as tmp:
        mod = Path(tmp) / "mod"
        out = Path(tmp) / "out"
        mod.mkdir()
        out.mkdir()
        (mod / "go.mod").write_text(c.go_mod)
        for rel, text in c.files.items():
            (mod / rel).parent.mkdir(parents=True, exist_ok=True)
            (mod / rel).write_text(text)
        if any(p.startswith("./") for p in c.packages):
            _go(["mod", "tidy"], mod, log)
        else:
            _go(["get", *(f"{p}@{c.version}" for p in c.packages)], mod, log)
        ldflags = f"-s -w {c.ldflags}".strip()
        tags = [f"-tags={c.tags}"] if c.tags else []
        _go(["build", "-trimpath", f"-ldflags={ldflags}", *tags, "-o", str(out) + "/", *c.packages], mod, log)
        for module, folder, dest in c.assets:
            shutil.copytree(_module_dir(mod, module) / folder, out / dest)
        shutil.copy(mod / "go.mod", out / "go.mod")
        if (mod / "go.sum").exists():
            shutil.copy(mod / "go.sum", out / "go.sum")
        if c.folder.exists():
            shutil.rmtree(c.folder)
        out.rename(c.folder)
    return time.monotonic() - start


# promtool (alert rule tests) comes in Debian's prometheus package; Prometheus itself is built above.
DEBIAN_TOOLS = {"kubectl": "kubectl", "promtool": "prometheus"}


def debian_tools(install: bool = True) -> dict[str, str]:
    """Paths of kubectl and promtool, installing missing ones from Debian when root."""
    missing = sorted({pkg for tool, pkg in DEBIAN_TOOLS.items() if shutil.which(tool) is None})
    if missing and install and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        quiet = {"stdout": subprocess.DEVNULL, "env": env}
        subprocess.run(["apt-get", "update", "-qq"], check=False, **quiet)  # type: ignore[call-overload]
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        subprocess.run(cmd, check=False, **quiet)  # type: ignore[call-overload]
    found = {}
    for tool in DEBIAN_TOOLS:
        path = shutil.which(tool)
        if path:
            found[tool] = path
    return found


def binaries() -> dict[str, Path]:
    """Paths of the built binaries by name (kube-apiserver, etcd, helm, versitygw, ...)."""
    return {b: c.folder / b for c in components() for b in c.binaries}


def ensure(verbose: bool = True) -> dict[str, float]:
    """Build every missing component; returns seconds per component built (empty when warm)."""
    spent: dict[str, float] = {}
    with _lock():
        for c in components():
            if c.cached():
                continue
            if verbose:
                print(f"building {c.name} {c.version} ...", file=sys.stderr, flush=True)
            spent[f"{c.name}-{c.version}"] = build(c)
            if verbose:
                print(f"  built in {spent[f'{c.name}-{c.version}']:.0f}s", file=sys.stderr, flush=True)
        if spent and all(c.cached() for c in components()):
            # Compiled packages are only needed while building; the module cache stays for rebuilds.
            shutil.rmtree(cache_root() / "go" / "build", ignore_errors=True)
    if spent:
        record = cache_root() / "build-times.json"
        times = json.loads(record.read_text()) if record.is_file() else {}
        times.update({k: round(v, 1) for k, v in spent.items()})
        record.write_text(json.dumps(times, indent=2) + "\n")
    return spent


def cache_size() -> int:
    """Bytes under the cache folder (binaries plus Go caches)."""
    total = 0
    for dirpath, _dirs, files in os.walk(cache_root()):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / f).lstat().st_size
    return total


def main() -> None:
    start = time.monotonic()
    spent = ensure()
    tools = debian_tools()
    for name, path in binaries().items():
        print(f"{name:26} {path}")
    for tool, where in tools.items():
        print(f"{tool:26} {where}")
    took = time.monotonic() - start
    print(f"built {len(spent)} component(s) in {took:.0f}s" if spent else f"all cached ({took:.1f}s)")


if __name__ == "__main__":
    main()
