#!/usr/bin/env python3
"""Checks of deploy/kubernetes that JSON schemas cannot make (validate.sh).

Usage: check_manifests.py FILE.yaml...   (needs PyYAML)
"""

import sys

import yaml


def main(paths):
    docs = []
    for p in paths:
        with open(p) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    problems = []

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    sts = by_kind["StatefulSet"]["charon"]
    pod = sts["spec"]["template"]
    labels = pod["metadata"]["labels"]
    need(sts["spec"]["selector"]["matchLabels"].items() <= labels.items(),
         "StatefulSet selector does not match its pod labels")
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    ports = {p["name"]: p for p in c["ports"]}

    def secs(name):
        return int(env[name]["value"])

    # The stop sequence fits in the grace period.
    # SIGTERM drains; a preStop hook may only wait. /drain takes POST with
    # the admin token, so an httpGet hook on it would only be refused (405).
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_s = pre.get("sleep", {}).get("seconds", 0)
    need(set(pre) <= {"sleep"},
         f"preStop hook {sorted(pre)}: SIGTERM drains the node; /drain needs POST and a token")
    total = pre_s + secs("CHARON_DRAIN_DELAY_SECS") + secs("CHARON_DRAIN_DEADLINE_SECS") \
        + secs("CHARON_DRAIN_SPREAD_SECS") + secs("CHARON_SHUTDOWN_GRACE_SECS")
    need(total < grace, f"preStop + drain + grace = {total}s is not under terminationGracePeriodSeconds {grace}s")
    deadline = pre_s + secs("CHARON_DRAIN_DEADLINE_SECS")
    need(deadline < grace, f"the drain deadline ({deadline}s after the stop) is not under {grace}s")
    print(f"  stop: preStop {pre_s}s + delay {secs('CHARON_DRAIN_DELAY_SECS')}s + deadline "
          f"{secs('CHARON_DRAIN_DEADLINE_SECS')}s + spread {secs('CHARON_DRAIN_SPREAD_SECS')}s + grace "
          f"{secs('CHARON_SHUTDOWN_GRACE_SECS')}s = {total}s < terminationGracePeriodSeconds {grace}s")

    # Probes.
    rp = c["readinessProbe"]["httpGet"]
    need(rp["path"] == "/readyz", "readiness probe is not /readyz")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        port = c[probe]["httpGet"]["port"]
        need(port in ports, f"{probe} names port {port!r}, which the container does not have")
    need(ports["admin"]["containerPort"] == 9090 and ports["api"]["containerPort"] == 7070,
         "container ports differ from the image's listeners (api 7070, admin 9090)")

    # Headless Service for the seeds.
    svc = by_kind["Service"]
    headless = svc[sts["spec"]["serviceName"]]
    need(headless["spec"].get("clusterIP") == "None", "the StatefulSet's serviceName is not headless")
    need(headless["spec"].get("publishNotReadyAddresses") is True,
         "the headless Service hides not-ready pods: starting nodes would not find seeds")
    need(headless["metadata"]["name"] in env["CHARON_SEEDS"]["value"], "CHARON_SEEDS does not name the headless Service")
    for s in svc.values():
        need(s["spec"]["selector"].items() <= labels.items(), f"Service {s['metadata']['name']} selects no pod")
        for p in s["spec"]["ports"]:
            need(p["targetPort"] in ports, f"Service {s['metadata']['name']} targets unknown port {p['targetPort']!r}")
            if p["targetPort"] in ports:
                need(p.get("protocol", "TCP") == ports[p["targetPort"]]["protocol"],
                     f"Service {s['metadata']['name']} port {p['name']}: protocol differs from the container's")

    # PodDisruptionBudget.
    pdb = by_kind["PodDisruptionBudget"]["charon"]
    need(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the PDB selects no pod")
    need(pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable"), "the PDB allows nothing")

    # Secrets: every key used exists in the example Secret.
    secret = by_kind["Secret"]["charon-secrets"]
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for e in c["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            need(ref["name"] == "charon-secrets" and ref["key"] in keys, f"env {e['name']}: unknown secret key {ref}")
    for v in pod["spec"]["volumes"]:
        if "secret" in v:
            for item in v["secret"].get("items", []):
                need(item["key"] in keys, f"volume {v['name']}: unknown secret key {item['key']}")
    need(env["CHARON_CLUSTER_SECRET_FILE"]["value"].startswith("/run/secrets/charon/"),
         "CHARON_CLUSTER_SECRET_FILE is not in the mounted Secret")

    # Non-root, read-only.
    psc, csc = pod["spec"]["securityContext"], c["securityContext"]
    need(psc.get("runAsNonRoot") and psc.get("runAsUser") == 10001, "pods do not run as the image's user 10001")
    need(csc.get("readOnlyRootFilesystem") and csc.get("allowPrivilegeEscalation") is False,
         "container is not read-only / may escalate")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    need("/var/lib/charon" in mounts, "the data dir is not on the persistent volume")

    for p in problems:
        print(f"  FAIL: {p}")
    if problems:
        sys.exit(1)
    print(f"  ok: {len(docs)} objects, no inconsistency")


if __name__ == "__main__":
    main(sys.argv[1:])
