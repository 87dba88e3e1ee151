#!/usr/bin/env python3
"""Offline validation of deploy/kubernetes/, run by scripts/kubernetes-check.sh (which
makes the venv with the pinned packages this needs).

  validate.py K8S_DIR [--kubectl PATH]

1. Every manifest file, and every variant kustomize renders from them (`kubectl
   kustomize`, when kubectl is there), against
   - the Kubernetes OpenAPI schemas of each version in KUBERNETES_VERSIONS, strict
     (an unknown field is an error), as the kubernetes-validate package ships them;
   - KEDA's CRD schemas for ScaledObject and TriggerAuthentication (../schemas/, from
     KEDA's repository by ../schemas/regenerate.py), made strict the same way (the API
     server's strict field validation, `kubectl apply`'s default, rejects unknown fields
     of a CRD too), their CEL rules evaluated;
   - each KEDA trigger's metadata against the parameters its scaler reads (names,
     types, enums, required ones, `<name>FromEnv`, TriggerAuthentication parameters).
2. Every rendered variant as a whole: the ScaledObject's target and names agree with
   the server's config in the generated ConfigMap (topic, group, consumer group or
   subscription, partitions, drain time below the grace period, the probes' port).
3. The server.toml files: TOML whose keys the server knows (the fields of the Rust
   config structs), and the same [server] table everywhere.
4. Every file in tests/broken/ must be rejected, with an error that contains its
   `# expect:` line: the check is not vacuous.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

# The oldest and newest Kubernetes that KEDA v2.20 (the CRDs in ../schemas) is tested with.
KUBERNETES_VERSIONS = ("1.33", "1.35")
KEDA_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-v1alpha1-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-v1alpha1-triggerauthentication.json",
}
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# The CEL rules (x-kubernetes-validations) of the KEDA CRDs, evaluated here in Python. A
# regenerated schema with a rule not listed fails the check until it is added.
CEL_RULES = {
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)":
        lambda spec: "minReplicaCount" not in spec
        or spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100),
}
# The variants scripts/kubernetes-check.sh renders: (name, components) on top of base/,
# besides the top kustomization.yaml itself ("default"). Every component is in one.
VARIANTS = [
    ("kafka-sasl", ["scaling/kafka", "scaling/kafka-sasl"]),
    ("prometheus", ["scaling/prometheus"]),
    ("redis", ["scaling/redis"]),
    ("pubsub", ["scaling/pubsub"]),
]
# Values Go's strconv.ParseBool accepts (KEDA parses bools with it).
GO_BOOLS = {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
# The Rust structs behind each table of the config file (deny_unknown_fields, all).
CONFIG_STRUCTS = {
    "server": ("app/src/config.rs", "ServerConfig"),
    "server.limits": ("app/src/config.rs", "DecodeLimits"),
    "broker:kafka": ("unified-broker/src/kafka/config.rs", "KafkaConfig"),
    "broker:redis": ("unified-broker/src/redis/config.rs", "RedisConfig"),
    "broker:pubsub": ("unified-broker/src/pubsub/config.rs", "PubSubConfig"),
}


class Problems:
    def __init__(self):
        self.items = []

    def add(self, where, message):
        self.items.append(f"{where}: {message}")


# ---------------------------------------------------------------- schemas


class Schemas:
    """Strict validators for Kubernetes kinds (per version) and KEDA's CRDs."""

    def __init__(self, schema_dir):
        package = os.path.dirname(kubernetes_validate.__file__)
        self.k8s_dir = os.path.join(package, "kubernetes-json-schema")
        self.cache = {}
        self.definitions = {}
        self.keda = {}
        self.cel = []
        for key, name in KEDA_SCHEMAS.items():
            with open(os.path.join(schema_dir, name)) as f:
                schema = json.load(f)
            self.keda_source = schema.get("x-source", {})
            strict = self.strict(schema, [], key[1])
            strict["properties"]["metadata"] = {"$ref": OBJECT_META}
            self.keda[key] = strict
        with open(os.path.join(schema_dir, "keda-scaler-parameters.json")) as f:
            self.scalers = json.load(f)["scalers"]

    def strict(self, node, path, kind):
        """An OpenAPI v3 (structural) schema as JSON Schema: objects with properties
        reject others unless the CRD keeps unknown fields; nullable allows null; CEL
        rules collected (they must be known, see CEL_RULES)."""
        node = {k: v for k, v in node.items() if k != "description"}
        for rule in node.pop("x-kubernetes-validations", []):
            if rule["rule"] not in CEL_RULES:
                raise SystemExit(f"{kind} schema at {'.'.join(path) or '(root)'}: CEL rule not "
                                 f"evaluated by this check, add it to CEL_RULES: {rule['rule']}")
            self.cel.append((kind, path, rule))
        if "properties" in node:
            node["properties"] = {k: self.strict(v, path + [k], kind) for k, v in node["properties"].items()}
            if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
        if isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = self.strict(node["additionalProperties"], path + ["*"], kind)
        if "items" in node:
            node["items"] = self.strict(node["items"], path + ["[]"], kind)
        for key in ("anyOf", "allOf", "oneOf"):
            if key in node:
                node[key] = [self.strict(n, path, kind) for n in node[key]]
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        return node

    def defs(self, version):
        if version not in self.definitions:
            with open(os.path.join(self.k8s_dir, f"v{version}.0-local-strict", "_definitions.json")) as f:
                self.definitions[version] = Resource.from_contents(json.load(f))
        return self.definitions[version]

    def validator(self, api_version, kind, version):
        key = (api_version, kind, version)
        if key not in self.cache:
            if (api_version, kind) in self.keda:
                schema = self.keda[(api_version, kind)]
            else:
                group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
                path = os.path.join(self.k8s_dir, f"v{version}.0-local-strict",
                                    f"{kind.lower()}-{group_version}.json")
                if not os.path.exists(path):
                    self.cache[key] = None
                    return None
                with open(path) as f:
                    schema = json.load(f)
            registry = Registry().with_resource(
                "https://kubernetes.io/api/_definitions.json", self.defs(version))
            self.cache[key] = jsonschema.Draft202012Validator(schema, registry=registry)
        return self.cache[key]


def at(doc, path):
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def validate_document(doc, where, schemas, problems):
    """Schema (every version), CEL rules, and for ScaledObjects each trigger's metadata."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        problems.add(where, "not a Kubernetes object (no apiVersion/kind)")
        return
    name = f"{doc['kind']}/{at(doc, ['metadata', 'name'])}"
    for version in KUBERNETES_VERSIONS:
        validator = schemas.validator(doc["apiVersion"], doc["kind"], version)
        if validator is None:
            problems.add(where, f"{name}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {version}")
            continue
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path))):
            path = ".".join(str(p) for p in error.path) or "(root)"
            problems.add(where, f"{name}: {path}: {error.message} (Kubernetes {version}"
                         + (", KEDA CRD)" if (doc["apiVersion"], doc["kind"]) in schemas.keda else ")"))
    for kind, path, rule in schemas.cel:
        node = at(doc, path)
        if doc["kind"] == kind and isinstance(node, dict):
            try:
                ok = CEL_RULES[rule["rule"]](node)
            except TypeError:
                ok = True  # a wrong type is the schema's to report
            if not ok:
                problems.add(where, f"{name}: {'.'.join(path)}: {rule.get('message', rule['rule'])} (KEDA CRD rule)")


# ---------------------------------------------------------------- KEDA triggers


def check_value(param, value):
    """Whether KEDA's typed config parses `value` as `param`'s type (None if fine)."""
    if not isinstance(value, str):
        return None  # the CRD schema reports it
    kind = param["type"]
    items = [v.strip() for v in value.split(",")] if kind.startswith("[]") else [value.strip()]
    base = kind.lstrip("[]")
    for item in items:
        if base in ("int", "int32", "int64") and not re.fullmatch(r"[+-]?\d+", item):
            return f"{item!r} is not an integer"
        if base == "float64":
            try:
                float(item)
            except ValueError:
                return f"{item!r} is not a number"
        if base == "bool" and item not in GO_BOOLS:
            return f"{item!r} is not a boolean"
        if "enum" in param and item not in param["enum"]:
            return f"{item!r} is not one of {param['enum']}"
    return None


def check_trigger(trigger, where, schemas, problems, auth_params=None, container_env=None):
    """One trigger's metadata against its scaler's parameters. `auth_params`: the
    parameter names its TriggerAuthentication gives (None: not known here);
    `container_env`: the target container's variables (None: not known here)."""
    kind = trigger.get("type")
    scaler = schemas.scalers.get(kind)
    if scaler is None:
        problems.add(where, f"trigger type {kind!r}: no parameter table (add it to schemas/regenerate.py SCALERS)")
        return
    metadata = trigger.get("metadata")
    if not isinstance(metadata, dict):
        return  # the CRD schema reports it
    by_name = {name: p for p in scaler["parameters"] for name in p["names"]}
    for key, value in metadata.items():
        base = key[: -len("FromEnv")] if key.endswith("FromEnv") else None
        if base in by_name and "resolvedEnv" in by_name[base]["order"]:
            if container_env is not None and value not in container_env:
                problems.add(where, f"{kind} trigger: {key}: {value!r} is not a variable of the target container")
            continue
        param = by_name.get(key)
        if param is None or "triggerMetadata" not in param["order"]:
            problems.add(where, f"{kind} trigger: unknown metadata key {key!r} (KEDA ignores it; "
                         f"its scaler reads {sorted(n for n, p in by_name.items() if 'triggerMetadata' in p['order'])})")
            continue
        if "deprecated" in param:
            problems.add(where, f"{kind} trigger: {key} is deprecated: {param['deprecated']}")
        error = check_value(param, value)
        if error:
            problems.add(where, f"{kind} trigger: {key}: {error}")
    for name in auth_params or ():
        param = by_name.get(name)
        if param is None or "authParams" not in param["order"]:
            problems.add(where, f"{kind} trigger: its TriggerAuthentication gives {name!r}, which the scaler does not read")
    for param in scaler["parameters"]:
        if not param["required"]:
            continue
        given = any(n in metadata for n in param["names"])
        given |= "resolvedEnv" in param["order"] and any(n + "FromEnv" in metadata for n in param["names"])
        if "authParams" in param["order"] and auth_params is None and trigger.get("authenticationRef"):
            given = True  # might come from a TriggerAuthentication not in this file
        given |= "authParams" in param["order"] and any(n in (auth_params or ()) for n in param["names"])
        if not given:
            problems.add(where, f"{kind} trigger: required metadata {'/'.join(param['names'])} missing")


def auth_parameters(trigger_auth):
    spec = trigger_auth.get("spec") or {}
    names = set()
    for key in ("secretTargetRef", "configMapTargetRef", "env"):
        names |= {ref.get("parameter") for ref in spec.get(key) or [] if isinstance(ref, dict)}
    return names


def check_keda_triggers(docs, where, schemas, problems, bundle):
    auths = {at(d, ["metadata", "name"]): d for d in docs if d.get("kind") == "TriggerAuthentication"}
    deployments = {at(d, ["metadata", "name"]): d for d in docs if d.get("kind") == "Deployment"}
    for doc in docs:
        if doc.get("kind") != "ScaledObject" or not isinstance(at(doc, ["spec", "triggers"]), list):
            continue
        target = deployments.get(at(doc, ["spec", "scaleTargetRef", "name"]))
        env = container_env(target, at(doc, ["spec", "scaleTargetRef", "envSourceContainerName"])) if target else None
        for index, trigger in enumerate(doc["spec"]["triggers"]):
            if not isinstance(trigger, dict):
                continue
            ref = trigger.get("authenticationRef")
            params = None
            if isinstance(ref, dict):
                if ref.get("name") in auths and ref.get("kind", "TriggerAuthentication") == "TriggerAuthentication":
                    params = auth_parameters(auths[ref["name"]])
                elif bundle:
                    problems.add(where, f"trigger {index}: authenticationRef {ref.get('name')!r}: no such TriggerAuthentication")
            check_trigger(trigger, f"{where}: ScaledObject trigger {index}", schemas, problems, params, env)


# ---------------------------------------------------------------- a rendered variant


def containers(deployment):
    return at(deployment, ["spec", "template", "spec", "containers"]) or []


def container_env(deployment, name=None):
    found = [c for c in containers(deployment) if name is None or c.get("name") == name]
    return {e.get("name") for e in (found[0].get("env") or [])} if found else set()


def env_value(container, name):
    for entry in container.get("env") or []:
        if entry.get("name") == name:
            return entry.get("value")
    return None


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def server_config(deployment, configmaps, where, problems):
    """The TOML the Deployment's CLASSIFIER_CONFIG names, from its ConfigMap volume."""
    container = containers(deployment)[0]
    path = env_value(container, "CLASSIFIER_CONFIG")
    if not path:
        problems.add(where, "Deployment: CLASSIFIER_CONFIG not set")
        return None
    volumes = {v.get("name"): v for v in at(deployment, ["spec", "template", "spec", "volumes"]) or []}
    for mount in container.get("volumeMounts") or []:
        directory = mount.get("mountPath", "").rstrip("/")
        if path.startswith(directory + "/"):
            configmap = at(volumes.get(mount.get("name"), {}), ["configMap", "name"])
            data = at(configmaps.get(configmap, {}), ["data", path[len(directory) + 1:]])
            if data is None:
                problems.add(where, f"Deployment: {path} is not a key of ConfigMap {configmap!r} in this bundle")
                return None
            try:
                return tomllib.loads(data)
            except tomllib.TOMLDecodeError as error:
                problems.add(where, f"ConfigMap {configmap}: {path}: not TOML: {error}")
                return None
    problems.add(where, f"Deployment: no volume mounted where CLASSIFIER_CONFIG={path} is")
    return None


def check_bundle(docs, where, problems):
    """What must agree between the objects of one rendered variant."""
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    configmaps = {at(d, ["metadata", "name"]): d for d in docs if d.get("kind") == "ConfigMap"}
    scaled = [d for d in docs if d.get("kind") == "ScaledObject"]
    if len(deployments) != 1:
        problems.add(where, f"expected one Deployment, found {len(deployments)}")
        return
    deployment = deployments[0]
    name = at(deployment, ["metadata", "name"])
    pod_labels = at(deployment, ["spec", "template", "metadata", "labels"]) or {}
    targets = [s for s in scaled if at(s, ["spec", "scaleTargetRef", "name"]) == name
               and at(s, ["spec", "scaleTargetRef", "kind"]) in (None, "Deployment")]
    if len(targets) != 1 or len(scaled) != 1:
        problems.add(where, f"expected exactly one ScaledObject, targeting Deployment {name}; found "
                     f"{len(scaled)}, {len(targets)} of them targeting it (only one may scale a Deployment)")
    if targets and at(deployment, ["spec", "replicas"]) is not None:
        problems.add(where, "Deployment sets spec.replicas although a ScaledObject owns the count "
                     "(every apply would reset it)")
    for doc in docs:
        if doc.get("kind") in ("Service", "PodDisruptionBudget"):
            selector = at(doc, ["spec", "selector"]) or {}
            selector = selector.get("matchLabels", selector) if doc["kind"] == "PodDisruptionBudget" else selector
            if not labels_match(selector, pod_labels):
                problems.add(where, f"{doc['kind']}/{at(doc, ['metadata', 'name'])}: selector {selector} does not select the pods {pod_labels}")

    config = server_config(deployment, configmaps, where, problems)
    if config is None:
        return
    server, broker = config.get("server", {}), config.get("broker", {})
    for key in ("request_topic", "group", "drain_timeout_secs", "max_in_flight"):
        if key not in server:
            problems.add(where, f"server config: set server.{key} explicitly (the autoscaler's names and limits follow it)")
            return
    if not (isinstance(server["request_topic"], str) and isinstance(server["group"], str)
            and isinstance(server["drain_timeout_secs"], int) and isinstance(server["max_in_flight"], int)):
        problems.add(where, "server config: request_topic and group must be strings, drain_timeout_secs "
                     "and max_in_flight integers")
        return
    topic, group, backend = server["request_topic"], server["group"], broker.get("backend", "embedded")

    grace = at(deployment, ["spec", "template", "spec", "terminationGracePeriodSeconds"])
    grace = 30 if grace is None else grace
    if isinstance(grace, int) and grace <= server["drain_timeout_secs"]:
        problems.add(where, f"terminationGracePeriodSeconds {grace} is not above server.drain_timeout_secs "
                     f"{server['drain_timeout_secs']}: the kubelet would kill the drain")

    container = containers(deployment)[0]
    address = env_value(container, "CLASSIFIER_METRICS_ADDR") or server.get("metrics_addr")
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    if not address:
        problems.add(where, "no metrics address (CLASSIFIER_METRICS_ADDR or server.metrics_addr): nothing answers the probes")
    else:
        port = int(address.rsplit(":", 1)[1]) if re.fullmatch(r".+:\d+", str(address)) else None
        if port is None:
            problems.add(where, f"metrics address {address!r} is not HOST:PORT")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe") if port else ():
            target = at(container, [probe, "httpGet", "port"])
            target = ports.get(target, target)
            if target is not None and target != port:
                problems.add(where, f"{probe} probes port {target}, the server listens on {port}")
            path = at(container, [probe, "httpGet", "path"])
            expected = "/readyz" if probe == "readinessProbe" else "/healthz"
            if path is not None and path != expected:
                problems.add(where, f"{probe} probes {path}, expected {expected}")

    for so in targets:
        spec = so["spec"]
        min_replicas, max_replicas = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not (isinstance(min_replicas, int) and isinstance(max_replicas, int)):
            continue  # the schema reports it
        for trigger in spec.get("triggers") or []:
            metadata = trigger.get("metadata") or {}
            kind = trigger.get("type")
            threshold = None
            if kind == "kafka":
                expect_group = f"{topic}.{group}" if broker.get("group_per_topic", True) else group
                if backend != "kafka":
                    problems.add(where, f"kafka trigger, but the server's broker is {backend!r}")
                if metadata.get("topic") != topic:
                    problems.add(where, f"kafka trigger: topic {metadata.get('topic')!r}, server.request_topic is {topic!r}")
                if metadata.get("consumerGroup") != expect_group:
                    problems.add(where, f"kafka trigger: consumerGroup {metadata.get('consumerGroup')!r}, the servers' "
                                 f"Kafka group is {expect_group!r} (\"<request_topic>.<group>\" with group_per_topic)")
                threshold = metadata.get("lagThreshold")
            elif kind == "redis-streams":
                if backend != "redis":
                    problems.add(where, f"redis-streams trigger, but the server's broker is {backend!r}")
                if metadata.get("stream") != topic or metadata.get("consumerGroup") != group:
                    problems.add(where, f"redis-streams trigger: stream/consumerGroup {metadata.get('stream')!r}/"
                                 f"{metadata.get('consumerGroup')!r}, the servers use {topic!r}/{group!r}")
                if "lagCount" not in metadata:
                    problems.add(where, "redis-streams trigger: no lagCount (pendingEntriesCount measures what "
                                 "replicas hold, at most max_in_flight each, not what waits)")
            elif kind == "prometheus":
                query = metadata.get("query", "")
                if re.search(r"classifier_backlog_(messages|drain_seconds)", query):
                    if backend not in ("kafka", "redis", "embedded"):
                        problems.add(where, f"prometheus trigger on classifier_backlog_*: not exported on {backend!r}")
                    for label, value in (("topic", topic), ("group", group)):
                        if not re.search(rf'\b{label}\s*=\s*"{re.escape(value)}"', query):
                            problems.add(where, f"prometheus trigger: query does not select {label}=\"{value}\"")
                    if re.match(r"\s*sum\b", query):
                        problems.add(where, "prometheus trigger: every replica reports the group's whole backlog: "
                                     "aggregate with max, not sum")
                    if min_replicas < 1:
                        problems.add(where, "prometheus trigger on the servers' own gauge with minReplicaCount 0: "
                                     "with no replica nothing reports the backlog, nothing scales up")
                    if "classifier_backlog_messages" in query and backend == "kafka":
                        threshold = metadata.get("threshold")
                elif "num_undelivered_messages" in query:
                    subscription = f"{topic}--{group}"
                    if backend != "pubsub":
                        problems.add(where, f"prometheus trigger on Pub/Sub's backlog, but the server's broker is {backend!r}")
                    if f'subscription_id="{subscription}"' not in query:
                        problems.add(where, f"prometheus trigger: query does not select subscription_id=\"{subscription}\"")
                    threshold = metadata.get("threshold")
                else:
                    problems.add(where, "prometheus trigger: query on neither classifier_backlog_* nor num_undelivered_messages")
            else:
                problems.add(where, f"trigger type {kind!r}: not one this deployment knows")
            if threshold is not None:
                try:
                    if float(threshold) <= server["max_in_flight"]:
                        problems.add(where, f"{kind} trigger: threshold {threshold} is not above server.max_in_flight "
                                     f"{server['max_in_flight']}, which it counts: requests in flight alone would scale up")
                except ValueError:
                    pass  # reported by the metadata check
        if backend == "kafka" or any(t.get("type") == "kafka" for t in spec.get("triggers") or []):
            partitions = broker.get("partitions")
            if not isinstance(partitions, int):
                problems.add(where, "server config: set broker.partitions explicitly (maxReplicaCount follows it)")
            elif max_replicas > partitions:
                problems.add(where, f"maxReplicaCount {max_replicas} is above broker.partitions {partitions}: "
                             "replicas beyond the partitions idle")


# ---------------------------------------------------------------- server.toml


def rust_fields(root, path, struct):
    with open(os.path.join(root, path)) as f:
        text = f.read()
    match = re.search(rf"^pub struct {struct} \{{\n(.*?)^\}}", text, re.M | re.S)
    if not match:
        raise SystemExit(f"{path}: struct {struct} not found (CONFIG_STRUCTS in {__file__})")
    return dict(re.findall(r"^\s*pub (\w+): ([^\n]+),$", match.group(1), re.M))


def toml_type_ok(rust, value):
    rust = re.sub(r"^Option<(.*)>$", r"\1", rust)
    if re.fullmatch(r"[ui](8|16|32|64|size)", rust):
        return isinstance(value, int) and not isinstance(value, bool)
    if rust == "bool":
        return isinstance(value, bool)
    if rust in ("String", "PathBuf", "SocketAddr"):
        return isinstance(value, str)
    if rust.startswith("Vec<"):
        return isinstance(value, list)
    return isinstance(value, dict)  # maps and nested structs


def check_server_toml(full_path, path, repo, problems, base_server):
    with open(full_path, "rb") as f:
        try:
            config = tomllib.load(f)
        except tomllib.TOMLDecodeError as error:
            problems.add(path, f"not TOML: {error}")
            return None
    broker = config.get("broker", {})
    tables = [("server", config.get("server", {})), ("server.limits", config.get("server", {}).get("limits", {})),
              (f"broker:{broker.get('backend')}", {k: v for k, v in broker.items() if k != "backend"})]
    for extra in set(config) - {"broker", "server"}:
        problems.add(path, f"[{extra}]: the server reads [broker] and [server] only")
    for table, values in tables:
        if table not in CONFIG_STRUCTS:
            problems.add(path, f"[broker] backend {broker.get('backend')!r}: not one of kafka, redis, pubsub")
            continue
        fields = rust_fields(repo, *CONFIG_STRUCTS[table])
        for key, value in values.items():
            if table == "server" and key == "limits":
                continue
            if key not in fields:
                problems.add(path, f"[{table.split(':')[0]}] {key}: not a setting ({CONFIG_STRUCTS[table][1]} in {CONFIG_STRUCTS[table][0]})")
            elif not toml_type_ok(fields[key], value):
                problems.add(path, f"[{table.split(':')[0]}] {key} = {value!r}: not a {fields[key]}")
    if base_server is not None and config.get("server") != base_server:
        problems.add(path, "[server] differs from base/server.toml's: keep them the same (names the autoscalers use)")
    return config


# ---------------------------------------------------------------- files, variants


def load_documents(path, problems):
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as error:
        problems.add(path, f"not YAML: {error}")
        return []


def kustomizations(k8s_dir):
    found = []
    for directory, subdirs, files in os.walk(k8s_dir):
        subdirs[:] = [d for d in subdirs if d not in ("tests", "schemas")]
        if "kustomization.yaml" in files:
            found.append(directory)
    return found


def render(kubectl, k8s_dir, problems, workdir):
    """(name, rendered path) of the top kustomization and of every VARIANTS entry."""
    rendered = []
    jobs = [("default", k8s_dir)]
    for name, components in VARIANTS:
        variant = os.path.join(workdir, name)
        os.makedirs(variant)
        with open(os.path.join(variant, "kustomization.yaml"), "w") as f:
            yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "namespace": "image-classifier",
                "resources": [os.path.relpath(os.path.join(k8s_dir, "base"), variant)],
                "components": [os.path.relpath(os.path.join(k8s_dir, c), variant) for c in components],
            }, f)
        jobs.append((name, variant))
    for name, directory in jobs:
        result = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True)
        if result.returncode != 0:
            problems.add(f"variant {name}", f"kubectl kustomize failed: {result.stderr.strip()}")
            continue
        out = os.path.join(workdir, f"{name}.yaml")
        with open(out, "w") as f:
            f.write(result.stdout)
        rendered.append((name, out))
    return rendered


def main():
    args = sys.argv[1:]
    kubectl = None
    if "--kubectl" in args:
        i = args.index("--kubectl")
        kubectl = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        raise SystemExit(__doc__)
    k8s_dir = os.path.abspath(args[0])
    repo = os.path.abspath(os.path.join(k8s_dir, "..", ".."))
    schemas = Schemas(os.path.join(k8s_dir, "schemas"))
    source = schemas.keda_source
    print(f"kubernetes-check: Kubernetes {', '.join(KUBERNETES_VERSIONS)} (kubernetes-validate "
          f"{kubernetes_validate.__version__}, strict); KEDA {source.get('ref')} "
          f"({source.get('commit', '?')[:12]}) CRDs, strict, CEL rules {len(schemas.cel)}")
    problems = Problems()
    counts = {"files": 0, "objects": 0, "variants": 0, "broken": 0}

    # Manifest files, each on its own; every one listed by a kustomization.
    listed = set()
    for directory in kustomizations(k8s_dir):
        path = os.path.join(directory, "kustomization.yaml")
        for doc in load_documents(path, problems):
            for entry in (doc.get("resources") or []) + (doc.get("components") or []):
                target = os.path.normpath(os.path.join(directory, entry))
                if not os.path.exists(target):
                    problems.add(path, f"{entry}: no such file or directory")
                listed.add(target)
            for generator in doc.get("configMapGenerator") or []:
                for entry in generator.get("files") or []:
                    listed.add(os.path.normpath(os.path.join(directory, entry.split("=")[-1])))
    base_server = None
    tomls = []
    for directory, subdirs, files in os.walk(k8s_dir):
        subdirs[:] = sorted(d for d in subdirs if d not in ("tests", "schemas"))
        for name in sorted(files):
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, k8s_dir)
            if name.endswith(".toml"):
                tomls.append(path)
            if not name.endswith((".yaml", ".yml", ".toml")) or name == "kustomization.yaml":
                continue
            if path not in listed:
                problems.add(relative, "not listed by any kustomization.yaml: never applied, never rendered here")
            if name.endswith(".toml"):
                continue
            docs = load_documents(path, problems)
            counts["files"] += 1
            for doc in docs:
                counts["objects"] += 1
                validate_document(doc, relative, schemas, problems)
            check_keda_triggers(docs, relative, schemas, problems, bundle=False)
    for path in sorted(tomls, key=lambda p: not p.endswith(os.path.join("base", "server.toml"))):
        config = check_server_toml(path, os.path.relpath(path, repo), repo, problems, base_server)
        if base_server is None and config is not None:
            base_server = config.get("server")

    # The variants kustomize renders, each as a whole.
    if kubectl:
        with tempfile.TemporaryDirectory(prefix="kubernetes-check-") as workdir:
            for name, path in render(kubectl, k8s_dir, problems, workdir):
                docs = load_documents(path, problems)
                counts["variants"] += 1
                where = f"variant {name} (rendered)"
                for doc in docs:
                    validate_document(doc, where, schemas, problems)
                check_keda_triggers(docs, where, schemas, problems, bundle=True)
                check_bundle(docs, where, problems)
                kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
                print(f"  variant {name}: {len(docs)} objects: {', '.join(kinds)}")
    else:
        print("  kubectl not found: the kustomize variants were not rendered (files checked one by one)")

    # The broken examples must fail, each for its stated reason.
    broken_dir = os.path.join(k8s_dir, "tests", "broken")
    for name in sorted(os.listdir(broken_dir)):
        path = os.path.join(broken_dir, name)
        with open(path) as f:
            expect = [line.split(":", 1)[1].strip() for line in f if line.startswith("# expect:")]
        if len(expect) != 1:
            problems.add(f"tests/broken/{name}", "needs exactly one `# expect: <part of the error>` line")
            continue
        # A file of several objects is a bundle (a variant in small); each file is
        # otherwise valid, so every error it gets must be the one it states.
        found = Problems()
        docs = load_documents(path, found)
        for doc in docs:
            validate_document(doc, name, schemas, found)
        check_keda_triggers(docs, name, schemas, found, bundle=len(docs) > 1)
        if len(docs) > 1:
            check_bundle(docs, name, found)
        others = [p for p in found.items if expect[0] not in p]
        counts["broken"] += 1
        if not found.items:
            problems.add(f"tests/broken/{name}", f"accepted, but should be rejected with {expect[0]!r}")
        elif others:
            problems.add(f"tests/broken/{name}", f"rejected, but not only for {expect[0]!r}: {others}")
        else:
            print(f"  rejected as expected: tests/broken/{name}: {found.items[0]}")

    for item in problems.items:
        print(f"ERROR {item}")
    print(f"kubernetes-check: {counts['files']} files ({counts['objects']} objects), {counts['variants']} "
          f"rendered variants, {counts['broken']} broken examples: "
          + ("all valid, broken ones rejected" if not problems.items else f"{len(problems.items)} problem(s)"))
    return 1 if problems.items else 0


if __name__ == "__main__":
    sys.exit(main())
