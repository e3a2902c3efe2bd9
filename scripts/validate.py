#!/usr/bin/env python3
"""Helpers of scripts/validate.sh (run with .venv-validate's Python: needs PyYAML, promql-parser).

  render DIR              print the kustomization in DIR rendered (the kustomize features used in deploy/)
  compare A B             are two rendered streams the same objects? (order-insensitive)
  split RENDERED OUTDIR   built-in kinds -> OUTDIR/builtin.yaml; each custom resource -> its own file;
                          prints "SCHEMA FILE" per custom resource (schema path relative to deploy/schemas)
  promql RENDERED...      parse every PrometheusRule expression
  invariants COMPOSE RENDERED...
                          cross-object rules: grace periods (Kubernetes and Compose), probe port, GPU
  env ROOT RENDERED...    every variable the code reads is in .env.example, and every variable that
                          docker-compose.yml and the manifests set is one of them

Each command prints one summary line on success and exits 1 with the reasons otherwise.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import sys

import yaml


def fail(msg: str) -> None:
    print(msg, file=sys.stderr)
    sys.exit(1)


def label(path: str) -> str:
    """rendered-cpu.yaml (a temporary file) -> 'overlay cpu'."""
    m = re.search(r"rendered-([A-Za-z0-9_-]+)\.yaml$", str(path))
    return f"overlay {m.group(1)}" if m else str(path)


def load_stream(path: str | pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def dump_stream(docs: list[dict]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=True, default_flow_style=False) for d in docs)


# ------------------------------------------------------------------------------------------------
# kustomize-lite: resources (files and directories), namespace, images, patches (strategic merge,
# by kind and name, from files). Anything else in a kustomization.yaml is an error, so the fallback
# can never silently render less than kustomize would.

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume", "IngressClass",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "RuntimeClass"}
# patchMergeKey of the core/apps lists we may patch; other lists (tolerations, args, ...) are replaced,
# as in Kubernetes' strategic merge patch.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
              "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort",
              "imagePullSecrets": "name", "hostAliases": "ip"}
BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1",
                  "rbac.authorization.k8s.io/v1", "scheduling.k8s.io/v1"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def strategic_merge(base, patch, builtin: bool):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if isinstance(key, str) and key.startswith("$"):
                fail(f"kustomize-lite: patch directive {key} is not supported")
            if value is None:
                out.pop(key, None)
            elif key in out and isinstance(value, list) and isinstance(out[key], list) and builtin \
                    and key in MERGE_KEYS:
                out[key] = merge_list(out[key], value, MERGE_KEYS[key], builtin)
            elif key in out:
                out[key] = strategic_merge(out[key], value, builtin)
            else:
                out[key] = copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def merge_list(base: list, patch: list, key: str, builtin: bool) -> list:
    out = [copy.deepcopy(x) for x in base]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            fail(f"kustomize-lite: list item without merge key {key!r}: {item!r}")
        for i, existing in enumerate(out):
            if isinstance(existing, dict) and existing.get(key) == item[key]:
                out[i] = strategic_merge(existing, item, builtin)
                break
        else:
            out.append(copy.deepcopy(item))
    return out


def split_image(image: str) -> tuple[str, str]:
    """'repo/name:tag' -> ('repo/name', ':tag'); digests ('@sha256:...') kept as the suffix."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def set_images(doc: dict, images: list[dict]) -> None:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec") if doc.get("kind") in WORKLOAD_KINDS else None
    if doc.get("kind") == "CronJob":
        pod = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if doc.get("kind") == "Pod":
        pod = spec
    if not pod:
        return
    for field in ("initContainers", "containers"):
        for c in pod.get(field, []) or []:
            name, suffix = split_image(c.get("image", ""))
            for img in images:
                if img.get("name") != name:
                    continue
                if "digest" in img:
                    suffix = "@" + img["digest"]
                elif "newTag" in img:
                    suffix = ":" + str(img["newTag"])
                c["image"] = img.get("newName", name) + suffix


def render(directory: pathlib.Path) -> list[dict]:
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        fail(f"kustomize-lite: {kfile} not found")
    k = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        fail(f"kustomize-lite: {kfile}: unsupported fields {sorted(unknown)} (install kustomize or kubectl)")
    docs: list[dict] = []
    for res in k.get("resources", []) or []:
        path = (directory / res).resolve()
        if path.is_dir():
            docs.extend(render(path))
        elif path.is_file():
            docs.extend(load_stream(path))
        else:
            fail(f"kustomize-lite: {kfile}: resource {res!r} does not exist")
    for p in k.get("patches", []) or []:
        if set(p) != {"path"}:
            fail(f"kustomize-lite: {kfile}: only `patches: - path: FILE` (no target, no inline) is supported")
        patch_path = directory / p["path"]
        if not patch_path.is_file():
            fail(f"kustomize-lite: {kfile}: patch {p['path']!r} does not exist")
        for patch in load_stream(patch_path):
            kind, name = patch.get("kind"), patch.get("metadata", {}).get("name")
            matches = [i for i, d in enumerate(docs) if d.get("kind") == kind and d["metadata"].get("name") == name]
            if len(matches) != 1:
                fail(f"kustomize-lite: {patch_path}: patch target {kind}/{name} matched {len(matches)} objects")
            i = matches[0]
            builtin = docs[i].get("apiVersion") in BUILTIN_GROUPS
            docs[i] = strategic_merge(docs[i], patch, builtin)
    if k.get("images"):
        for d in docs:
            set_images(d, k["images"])
    if k.get("namespace"):
        for d in docs:
            if d.get("kind") not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = k["namespace"]
    return docs


def key_of(d: dict) -> tuple:
    m = d.get("metadata", {})
    return (d.get("apiVersion"), d.get("kind"), m.get("namespace"), m.get("name"))


def cmd_compare(a: str, b: str) -> None:
    da = {key_of(d): d for d in load_stream(a)}
    db = {key_of(d): d for d in load_stream(b)}
    problems = []
    for k in sorted(set(da) | set(db), key=str):
        if k not in da or k not in db:
            problems.append(f"{'/'.join(map(str, k))}: only in {'the first' if k in da else 'the second'}")
        elif da[k] != db[k]:
            problems.append(f"{'/'.join(map(str, k))}: differs\n--- {a}\n{yaml.safe_dump(da[k])}--- {b}\n"
                            f"{yaml.safe_dump(db[k])}")
    if problems:
        fail("\n".join(problems))
    print(f"{len(da)} objects identical")


# ------------------------------------------------------------------------------------------------

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh/scaledobject_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com/servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com/prometheusrule_v1.json",
}


def cmd_split(rendered: str, outdir: str) -> None:
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    builtin, listing = [], []
    for d in load_stream(rendered):
        api, kind = d.get("apiVersion"), d.get("kind")
        if api in BUILTIN_GROUPS:
            builtin.append(d)
            continue
        schema = CRD_SCHEMAS.get((api, kind))
        if schema is None:
            fail(f"{label(rendered)}: no schema vendored in deploy/schemas for {api} {kind}")
        f = out / f"cr-{kind}-{d['metadata']['name']}.yaml"
        f.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
        listing.append(f"{schema} {f}")
    (out / "builtin.yaml").write_text(dump_stream(builtin), encoding="utf-8")
    print("\n".join(listing))


def cmd_promql(rendered: list[str]) -> None:
    import promql_parser

    count, problems = 0, []
    for path in rendered:
        for d in load_stream(path):
            if d.get("kind") != "PrometheusRule":
                continue
            for group in d["spec"].get("groups", []):
                for rule in group.get("rules", []):
                    name = rule.get("alert") or rule.get("record")
                    try:
                        promql_parser.parse(str(rule["expr"]))
                        count += 1
                    except Exception as e:  # the parser raises ValueError with the position
                        problems.append(f"{label(path)}: rule {name}: {e}\n    expr: {rule['expr']}")
    if problems:
        fail("\n".join(problems))
    print(f"{count} expressions parse")


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def seconds(duration: str) -> float:
    """Compose duration ('90s', '1m30s', '2m') -> seconds."""
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    if not parts or "".join(n + u for n, u in parts) != str(duration):
        fail(f"cannot read the duration {duration!r}")
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def compose_default(value) -> str:
    """'${NAME:-60}' -> '60' (the value used without a .env); anything else unchanged."""
    m = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", str(value))
    return m.group(1) if m else str(value)


def cmd_invariants(compose_path: str, rendered: list[str]) -> None:
    problems, checked = [], 0
    compose = yaml.safe_load(pathlib.Path(compose_path).read_text(encoding="utf-8"))
    for name, svc in (compose.get("services") or {}).items():
        command = svc.get("command") or []
        if "worker" not in (command if isinstance(command, list) else str(command).split()):
            continue
        env = svc.get("environment") or {}
        grace = int(compose_default(env.get("WORKER_GRACE_SECONDS", 60)))
        stop = seconds(svc.get("stop_grace_period", "10s"))
        if stop <= grace:
            problems.append(f"docker-compose.yml: service {name}: stop_grace_period {stop:g}s must exceed "
                            f"WORKER_GRACE_SECONDS {grace}, or docker stop SIGKILLs the checkpoint")
        checked += 1
    for path in rendered:
        docs = load_stream(path)
        cms = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d.get("kind") == "ConfigMap"}
        for dep in (d for d in docs if d.get("kind") == "Deployment"):
            pod = dep["spec"]["template"]["spec"]
            env = {}
            for c in pod["containers"]:
                for src in c.get("envFrom", []):
                    if "configMapRef" in src:
                        env.update(cms.get(src["configMapRef"]["name"], {}))
                for e in c.get("env", []):
                    if "value" in e:
                        env[e["name"]] = e["value"]
                grace = int(env.get("WORKER_GRACE_SECONDS", 60))
                tgps = int(pod.get("terminationGracePeriodSeconds", 30))
                if tgps <= grace:
                    problems.append(f"{label(path)}: {dep['metadata']['name']}: terminationGracePeriodSeconds {tgps} "
                                    f"must exceed WORKER_GRACE_SECONDS {grace}, or SIGKILL cuts the checkpoint")
                http = port_of(env.get("WORKER_HTTP_ADDR", "0.0.0.0:8080"))
                named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    get = c.get(probe, {}).get("httpGet")
                    if get:
                        port = named.get(get["port"], get["port"])
                        if port != http:
                            problems.append(f"{label(path)}: {probe} targets port {port}, WORKER_HTTP_ADDR listens on {http}")
                ann = dep["spec"]["template"]["metadata"].get("annotations", {})
                if "prometheus.io/port" in ann and int(ann["prometheus.io/port"]) != http:
                    problems.append(f"{label(path)}: prometheus.io/port {ann['prometheus.io/port']} != {http}")
                device = env.get("AUDOTICS_DEVICE", "auto")
                gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                if device == "cuda" and (not gpus or ":cuda" not in c["image"]):
                    problems.append(f"{label(path)}: AUDOTICS_DEVICE=cuda needs an nvidia.com/gpu limit and the :cuda image "
                                    f"(limit {gpus}, image {c['image']})")
                if gpus and device != "cuda":
                    problems.append(f"{label(path)}: a GPU is requested but AUDOTICS_DEVICE is {device!r}")
                checked += 1
    if problems:
        fail("\n".join(problems))
    print(f"{checked} worker containers (compose and overlays): grace periods, probe ports, device/GPU consistent")


# ------------------------------------------------------------------------------------------------
# Environment variables.

# Read by dependencies rather than by a clap attribute: object_store's AmazonS3Builder::from_env (the
# ones the README documents) and tracing-subscriber's EnvFilter::try_from_default_env.
LIBRARY_READS = {"AWS_ENDPOINT", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ALLOW_HTTP",
                 "RUST_LOG"}
# Read by the code but deliberately not settings of the trainer. Test-only and process variables,
# plus: RAYON_NUM_THREADS is rayon's own knob, which main.rs only honours (AUDOTICS_CPU_THREADS is
# ours); AUDOTICS_BENCH_* configure the `bench` developer subcommand (BENCHMARKS.md).
NOT_SETTINGS = re.compile(r"^(TEST_DATABASE_URL|S3S_FS_BIN|CARGO_.*|HOME|PATH|RAYON_NUM_THREADS|AUDOTICS_BENCH_.*)$")
CLAP_ENV = re.compile(r'\benv\s*=\s*"([A-Za-z_][A-Za-z0-9_]*)"')
STD_ENV = re.compile(r'\benv::var(?:_os)?\(\s*"([A-Za-z_][A-Za-z0-9_]*)"')
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:?+-][^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def env_example(root: pathlib.Path) -> set[str]:
    names = set()
    for line in (root / ".env.example").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=", line)
        if m:
            names.add(m.group(1))
    return names


def cmd_env(root_arg: str, rendered: list[str]) -> None:
    root = pathlib.Path(root_arg)
    documented = env_example(root)
    problems = []

    read: dict[str, str] = {}
    for rs in sorted((root / "src").rglob("*.rs")):
        text = rs.read_text(encoding="utf-8")
        for rx in (CLAP_ENV, STD_ENV):
            for m in rx.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                read.setdefault(m.group(1), f"{rs.relative_to(root)}:{line}")
    for name in LIBRARY_READS:
        read.setdefault(name, "README (object_store / tracing)")
    settings = {n: where for n, where in read.items() if not NOT_SETTINGS.match(n)}
    for name, where in sorted(settings.items()):
        if name not in documented:
            problems.append(f"{name} (read at {where}) is missing from .env.example")
    for name in sorted(documented - set(settings)):
        problems.append(f".env.example lists {name}, which nothing reads")

    used: dict[str, str] = {}
    compose_path = root / "docker-compose.yml"
    compose_text = compose_path.read_text(encoding="utf-8")
    for m in INTERPOLATION.finditer(compose_text):
        name = m.group(1) or m.group(2)
        line = compose_text.count("\n", 0, m.start()) + 1
        used.setdefault(name, f"docker-compose.yml:{line} (interpolation)")
    compose = yaml.safe_load(compose_text)
    for svc_name, svc in (compose.get("services") or {}).items():
        image = str(svc.get("image", ""))
        if "build" not in svc and not image.startswith("audotics-trainer"):
            continue  # third-party images have their own variables (POSTGRES_DB, MINIO_ROOT_USER, ...)
        env = svc.get("environment") or {}
        names = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for name in names:
            used.setdefault(name, f"docker-compose.yml services.{svc_name}.environment")

    for path in rendered:
        for d in load_stream(path):
            kind, name = d.get("kind"), d.get("metadata", {}).get("name")
            if kind == "ConfigMap":
                for k in d.get("data", {}):
                    used.setdefault(k, f"{label(path)}: ConfigMap {name}")
            if kind == "Deployment":
                for c in d["spec"]["template"]["spec"]["containers"]:
                    for e in c.get("env", []):
                        used.setdefault(e["name"], f"{label(path)}: Deployment {name} env")
                        ref = e.get("valueFrom", {}).get("secretKeyRef")
                        if ref:
                            used.setdefault(ref["key"], f"{label(path)}: Secret key {ref['name']}/{ref['key']}")
            if kind == "ScaledObject":
                for t in d["spec"].get("triggers", []):
                    for k, v in t.get("metadata", {}).items():
                        if k.endswith("FromEnv"):
                            used.setdefault(v, f"{label(path)}: ScaledObject {name} {k}")
    example_secret = root / "deploy/base/secret.example.yaml"
    if example_secret.is_file():
        for d in load_stream(example_secret):
            for k in list((d.get("stringData") or {})) + list((d.get("data") or {})):
                used.setdefault(k, "deploy/base/secret.example.yaml")
    for name, where in sorted(used.items()):
        if name not in documented:
            problems.append(f"{name} (set at {where}) is not a variable of .env.example")
    if problems:
        fail("\n".join(problems))
    print(f"{len(settings)} variables read by the code, {len(used)} set by compose/manifests, "
          f"all in .env.example ({len(documented)})")


def main() -> None:
    if len(sys.argv) < 2:
        fail(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "render" and len(args) == 1:
        print(dump_stream(render(pathlib.Path(args[0]))), end="")
    elif cmd == "compare" and len(args) == 2:
        cmd_compare(*args)
    elif cmd == "split" and len(args) == 2:
        cmd_split(*args)
    elif cmd == "promql" and args:
        cmd_promql(args)
    elif cmd == "invariants" and len(args) >= 2:
        cmd_invariants(args[0], args[1:])
    elif cmd == "env" and len(args) >= 1:
        cmd_env(args[0], args[1:])
    else:
        fail(__doc__)


if __name__ == "__main__":
    main()
