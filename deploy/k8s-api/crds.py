"""Install CRDs with server-side apply and wait until the API server serves their kinds.

usage: crds.py KUBECONFIG CRD_FILE... [--timeout SECONDS]

Server-side apply, as ``kubectl apply --server-side`` does: KubeRay's CRDs are too large for
client-side apply (its last-applied annotation would exceed the 262,144-byte limit, as on a real
cluster). Then waits for each CRD's Established condition and for its group/version to list the
kind in discovery, which is what clients look up first. Needs the ``kubernetes`` client (a
dependency of shipyard), so it runs with the project's Python.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import yaml
from kubernetes import client, config

FIELD_MANAGER = "shipyard-k8s-api"


def apply(api: client.ApiClient, crd: dict) -> None:
    # PATCH with the apply content type: the server takes the body as the manager's full intent
    # (what `kubectl apply --server-side --force-conflicts` sends). The answer is not read.
    client.ApiextensionsV1Api(api).patch_custom_resource_definition(
        crd["metadata"]["name"], crd, field_manager=FIELD_MANAGER, force=True,
        _content_type="application/apply-patch+yaml", _preload_content=False, _request_timeout=60)


def served(api: client.ApiClient, crd: dict) -> bool:
    """Discovery lists the kind in every served version and the CRD says Established. Discovery
    first: its answer is small, while the CRD comes back whole (1.4 MB, read as raw JSON: the
    client's models take seconds to build from it)."""
    group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
    for version in (v["name"] for v in crd["spec"]["versions"] if v.get("served")):
        try:
            resources = client.CustomObjectsApi(api).get_api_resources(group, version, _request_timeout=10)
        except client.ApiException as e:
            if e.status == 404:
                return False
            raise
        if plural not in {r.name for r in resources.resources}:
            return False
    raw = client.ApiextensionsV1Api(api).read_custom_resource_definition(
        crd["metadata"]["name"], _preload_content=False, _request_timeout=10)
    conditions = json.loads(raw.data).get("status", {}).get("conditions", [])
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kubeconfig")
    parser.add_argument("crds", nargs="+")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args(argv)
    api = config.new_client_from_config(config_file=args.kubeconfig)
    crds = []
    for path in args.crds:
        with open(path, encoding="utf-8") as f:
            # libyaml's loader: KubeRay's RayJob CRD is 1.4 MB, seconds for the pure-Python one.
            docs = yaml.load_all(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            crds += [d for d in docs if d and d.get("kind") == "CustomResourceDefinition"]
    if not crds:
        sys.exit(f"crds.py: no CustomResourceDefinition in {args.crds}")
    # In parallel: the server spends seconds on each (a 1.4 MB schema to validate and compile).
    with ThreadPoolExecutor(len(crds)) as pool:
        list(pool.map(lambda crd: apply(api, crd), crds))
    deadline = time.monotonic() + args.timeout
    waiting = list(crds)
    while waiting:
        waiting = [crd for crd in waiting if not served(api, crd)]
        if waiting and time.monotonic() > deadline:
            names = ", ".join(crd["metadata"]["name"] for crd in waiting)
            sys.exit(f"crds.py: not Established and served after {args.timeout:.0f} s: {names}")
        if waiting:
            time.sleep(0.25)
    print(" ".join(crd["metadata"]["name"] for crd in crds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
