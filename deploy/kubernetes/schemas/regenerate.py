#!/usr/bin/env python3
"""Regenerates the KEDA schemas in this folder from KEDA's own repository.

Made from KEDA v2.20.2 (tag commit 68a5b5028f35b22d50597c69819ab32c4e92f21a, 2026-07-31),
the release tested with Kubernetes 1.33 to 1.35:

  keda-v1alpha1-scaledobject.json           openAPIV3Schema of config/crd/bases/
  keda-v1alpha1-triggerauthentication.json  keda.sh_{scaledobjects,triggerauthentications}.yaml
  keda-scaler-parameters.json               the trigger metadata each scaler we use reads:
                                            the `keda:"..."` tags of its metadata struct

Usage, with a clone of https://github.com/kedacore/keda (a work tree or a bare git
directory) and PyYAML (scripts/kubernetes-check.sh's venv has it):

  .tools/kubernetes-venv/bin/python deploy/kubernetes/schemas/regenerate.py PATH/TO/keda [REF]

REF (a tag or commit, default v2.20.2) is read with `git show`, so the work tree may be
on any branch. Then update the version named above, in scripts/kubernetes-check.sh and
in deploy/kubernetes/README.md, and run the check: a new CEL rule in a CRD, a scaler
parameter renamed or a new tag keyword fails it until the check knows about them.
"""

import json
import os
import re
import subprocess
import sys

import yaml

DEFAULT_REF = "v2.20.2"
HERE = os.path.dirname(os.path.abspath(__file__))

CRDS = {
    "keda-v1alpha1-scaledobject.json": "config/crd/bases/keda.sh_scaledobjects.yaml",
    "keda-v1alpha1-triggerauthentication.json": "config/crd/bases/keda.sh_triggerauthentications.yaml",
}

# Trigger type -> (file, struct) of the metadata its scaler parses with
# scalersconfig.TypedConfig; nested structs are looked up in every file listed here.
SCALERS = {
    "kafka": ("pkg/scalers/kafka_scaler.go", "kafkaMetadata"),
    "redis-streams": ("pkg/scalers/redis_streams_scaler.go", "redisStreamsMetadata"),
    "prometheus": ("pkg/scalers/prometheus_scaler.go", "prometheusMetadata"),
}
STRUCT_FILES = [
    "pkg/scalers/kafka_scaler.go",
    "pkg/scalers/redis_streams_scaler.go",
    "pkg/scalers/redis_scaler.go",
    "pkg/scalers/prometheus_scaler.go",
    "pkg/scalers/authentication/authentication_types.go",
]
# Tag keywords of pkg/scalers/scalersconfig/typed_config.go (paramsFromTag).
TAG_KEYWORDS = {"name", "order", "optional", "default", "enum", "deprecated",
                "deprecatedAnnounce", "exclusiveSet", "range", "separator"}


def git(repo, *args):
    git_dir = os.path.join(repo, ".git") if os.path.isdir(os.path.join(repo, ".git")) else repo
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True,
                          capture_output=True, text=True).stdout


def crd_schema(text, path):
    crd = yaml.safe_load(text)
    versions = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    if len(versions) != 1:
        sys.exit(f"{path}: expected one version v1alpha1, found {[v['name'] for v in crd['spec']['versions']]}")
    return crd["spec"]["group"], crd["spec"]["names"]["kind"], versions[0]["schema"]["openAPIV3Schema"]


def structs(text):
    """Every `type X struct { ... }` of a Go file: name -> body lines."""
    found = {}
    for match in re.finditer(r"^type\s+(\w+)\s+struct\s*\{\n(.*?)^\}", text, re.M | re.S):
        found[match.group(1)] = match.group(2).splitlines()
    return found


def parse_tag(tag, where):
    params = {}
    for part in tag.split(","):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not key:
            continue
        if key not in TAG_KEYWORDS:
            sys.exit(f"{where}: unknown keda tag keyword {key!r}: teach regenerate.py and the check")
        params[key] = value if _ else True
    return params


def fields(struct, index, optional, where):
    """The parameters of `struct`, nested structs (fields without name=) flattened."""
    out = []
    for line in index[struct]:
        match = re.match(r'^\s*(\w+\s+)?([\w.*\[\]]+)\s+`[^`]*keda:"([^"]*)"', line)
        if not match:
            continue
        field_type = match.group(2)
        tag = parse_tag(match.group(3), f"{where} {struct}")
        nested_optional = optional or tag.get("optional") is True
        if "name" not in tag:
            nested = field_type.lstrip("*").split(".")[-1]
            if nested not in index:
                sys.exit(f"{where}: nested struct {nested} of {struct} not found in {STRUCT_FILES}")
            out += fields(nested, index, nested_optional, where)
            continue
        order = [o.strip() for o in str(tag.get("order", "")).split(";") if o.strip()]
        out.append({
            "names": [n.strip() for n in tag["name"].split(";")],
            "order": order,
            "type": field_type,
            "required": not (nested_optional or "default" in tag or "deprecated" in tag),
            **({"default": tag["default"]} if "default" in tag else {}),
            **({"enum": [e.strip() for e in tag["enum"].split(";")]} if "enum" in tag else {}),
            **({"deprecated": tag["deprecated"]} if "deprecated" in tag else {}),
        })
    return out


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    repo, ref = sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else DEFAULT_REF
    commit = git(repo, "rev-parse", f"{ref}^{{commit}}").strip()
    source = {"repository": "https://github.com/kedacore/keda", "ref": ref, "commit": commit}

    for out, path in CRDS.items():
        group, kind, schema = crd_schema(git(repo, "show", f"{commit}:{path}"), path)
        document = {"$comment": f"openAPIV3Schema of {kind}.{group}/v1alpha1 from {path}",
                    "x-source": {**source, "path": path}, **schema}
        with open(os.path.join(HERE, out), "w") as f:
            json.dump(document, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {out} ({kind}, {ref} {commit[:12]})")

    index = {}
    for path in STRUCT_FILES:
        index.update(structs(git(repo, "show", f"{commit}:{path}")))
    scalers = {}
    for trigger, (path, struct) in SCALERS.items():
        if struct not in index:
            sys.exit(f"{path}: struct {struct} not found")
        scalers[trigger] = {"source": f"{path} {struct}",
                            "parameters": fields(struct, index, False, path)}
    document = {"$comment": "trigger metadata the scalers read (keda struct tags), see regenerate.py",
                "x-source": source, "scalers": scalers}
    with open(os.path.join(HERE, "keda-scaler-parameters.json"), "w") as f:
        json.dump(document, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote keda-scaler-parameters.json (" + ", ".join(
        f"{t}: {len(s['parameters'])}" for t, s in scalers.items()) + ")")


if __name__ == "__main__":
    main()
