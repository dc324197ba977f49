"""The part of the JobSet v1alpha2 schema that launch/'s templates use: every field name and its type.

Written from the JobSet API types (kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go: JobSetSpec,
ReplicatedJob, Network, FailurePolicy) and the Kubernetes core types they embed (batch/v1 JobSpec, core/v1
PodSpec, Container, EnvVar, ResourceRequirements, Volume). A field missing here is an error, so a template that
gains a field must add it here too, from those types. `validate` returns the list of problems, empty when none.
"""

from __future__ import annotations

STR, INT, BOOL = str, int, bool
QUANTITY = (int, str)  # resource quantities: 8 or "8"


def _obj(fields, required=()):
  return {"type": "object", "fields": fields, "required": tuple(required)}


def _list(item):
  return {"type": "list", "item": item}


def _map(value):
  return {"type": "map", "value": value}


_ENV_VAR = _obj({
    "name": STR, "value": STR,
    "valueFrom": _obj({"fieldRef": _obj({"fieldPath": STR, "apiVersion": STR}, ["fieldPath"])}),
}, ["name"])
_CONTAINER = _obj({
    "name": STR, "image": STR, "command": _list(STR), "args": _list(STR), "workingDir": STR,
    "env": _list(_ENV_VAR),
    "ports": _list(_obj({"containerPort": INT, "name": STR, "protocol": STR}, ["containerPort"])),
    "resources": _obj({"limits": _map(QUANTITY), "requests": _map(QUANTITY)}),
    "volumeMounts": _list(_obj({"name": STR, "mountPath": STR, "readOnly": BOOL}, ["name", "mountPath"])),
}, ["name", "image"])
_POD_SPEC = _obj({
    "restartPolicy": {"type": "enum", "values": ("Never", "OnFailure", "Always")},
    "hostNetwork": BOOL, "dnsPolicy": {"type": "enum", "values": ("ClusterFirst", "ClusterFirstWithHostNet",
                                                                  "Default", "None")},
    "nodeSelector": _map(STR), "containers": _list(_CONTAINER), "serviceAccountName": STR,
    "volumes": _list(_obj({"name": STR, "persistentVolumeClaim": _obj({"claimName": STR, "readOnly": BOOL},
                                                                      ["claimName"])}, ["name"])),
}, ["containers"])
_JOB_SPEC = _obj({
    "parallelism": INT, "completions": INT, "completionMode": {"type": "enum", "values": ("Indexed", "NonIndexed")},
    "backoffLimit": INT, "template": _obj({"metadata": _obj({"labels": _map(STR), "annotations": _map(STR)}),
                                           "spec": _POD_SPEC}, ["spec"]),
}, ["template"])
JOBSET = _obj({
    "apiVersion": {"type": "enum", "values": ("jobset.x-k8s.io/v1alpha2",)},
    "kind": {"type": "enum", "values": ("JobSet",)},
    "metadata": _obj({"name": STR, "namespace": STR, "labels": _map(STR), "annotations": _map(STR)}, ["name"]),
    "spec": _obj({
        "network": _obj({"enableDNSHostnames": BOOL, "subdomain": STR, "publishNotReadyAddresses": BOOL}),
        "failurePolicy": _obj({"maxRestarts": INT}),
        "replicatedJobs": _list(_obj({"name": STR, "replicas": INT,
                                      "template": _obj({"spec": _JOB_SPEC}, ["spec"])}, ["name", "template"])),
    }, ["replicatedJobs"]),
}, ["apiVersion", "kind", "metadata", "spec"])


def validate(value, schema=JOBSET, path="") -> list[str]:
  """Problems of `value` (parsed YAML) against `schema`: unknown or missing fields, wrong types."""
  where = path or "<root>"
  if isinstance(schema, (type, tuple)):
    types = schema if isinstance(schema, tuple) else (schema,)
    # YAML booleans are not integers here, as in Kubernetes' schema.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
      return [f"{where}: expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__} {value!r}"]
    return []
  kind = schema["type"]
  if kind == "enum":
    return [] if value in schema["values"] else [f"{where}: {value!r} is not one of {schema['values']}"]
  if kind == "list":
    if not isinstance(value, list):
      return [f"{where}: expected a list, got {type(value).__name__}"]
    return [p for i, v in enumerate(value) for p in validate(v, schema["item"], f"{path}[{i}]")]
  if not isinstance(value, dict):
    return [f"{where}: expected a mapping, got {type(value).__name__}"]
  if kind == "map":
    return [p for k, v in value.items() for p in
            ([f"{where}: key {k!r} is not a string"] if not isinstance(k, str) else [])
            + validate(v, schema["value"], f"{path}.{k}")]
  problems = [f"{where}: unknown field {k!r}" for k in value if k not in schema["fields"]]
  problems += [f"{where}: missing field {k!r}" for k in schema["required"] if k not in value]
  for k, v in value.items():
    if k in schema["fields"]:
      problems += validate(v, schema["fields"][k], f"{path}.{k}")
  return problems
