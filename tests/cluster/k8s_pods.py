#!/usr/bin/env python3
"""Runs the pod spec of deploy/kubernetes/statefulset.yaml on Docker.

There is no Kubernetes here, so this plays the kubelet's part for three
replicas (charon-0..2 in namespace `charon`) with what the manifest says:
  - env exactly as written: fieldRef (metadata.name, metadata.namespace,
    status.podIP), $(VAR) expansion of earlier variables, secretKeyRef from
    a generated Secret with the keys of secret.example.yaml;
  - the Secret volume (items, mountPath), the data volume at its mountPath;
  - securityContext: runAsUser/runAsGroup, readOnlyRootFilesystem, drop ALL,
    no privilege escalation;
  - the headless Service: a DNS name (charon-gossip.charon.svc) that
    resolves to every pod, ready or not (a Docker network alias);
  - readiness: the readinessProbe's path and port; the pod's stop: preStop
    sleep (if any), then SIGTERM, and at most terminationGracePeriodSeconds.
Then it checks that the three nodes form one converged cluster through the
seeds, that `charonctl` works inside a pod with the Secret's token, that
another pod cannot drain a pod through its admin port without the token,
that a stopped pod drains and exits 0 within the grace period, and that a
pod recreated with a new IP on the same volume rejoins.

Usage: k8s_pods.py   (needs PyYAML: validate.sh's venv has it; docker)
Exit: 0 passed, 1 failed.
"""

import atexit
import ipaddress
import signal
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
K8S = os.path.join(REPO, "deploy", "kubernetes")
NS = "charon"
IMAGE = os.environ.get("CHARON_IMAGE", "charon:local")


def docker(*args, check=True, timeout=120):
    p = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise SystemExit(f"FAILED: docker {' '.join(args)}: {p.stderr.strip()}")
    return p


def load(name):
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def main():
    (sts,) = load("statefulset.yaml")
    services = {d["metadata"]["name"]: d for d in load("services.yaml")}
    (secret_example,) = load("secret.example.yaml")
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    headless = services[sts["spec"]["serviceName"]]
    dns_name = f"{headless['metadata']['name']}.{NS}.svc"
    grace = pod["terminationGracePeriodSeconds"]
    pre_stop_hook = c.get("lifecycle", {}).get("preStop", {})
    if set(pre_stop_hook) - {"sleep"}:
        raise SystemExit(f"FAILED: preStop {sorted(pre_stop_hook)}: only a sleep is played here")
    pre_stop = pre_stop_hook.get("sleep", {}).get("seconds", 0)
    ready = c["readinessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    ready_port = ports.get(ready["port"], ready["port"])
    secret_values = {k: secrets.token_hex(24) for k in secret_example["stringData"]}

    tag = f"k8s{os.getpid()}"
    net = f"charon-{tag}"
    tmp = tempfile.mkdtemp(prefix="charon-k8s-pods-")
    made = {"containers": [], "volumes": []}

    def cleanup():
        for cname in made["containers"]:
            docker("rm", "-f", "-v", cname, check=False)
        for vol in made["volumes"]:
            docker("volume", "rm", vol, check=False)
        docker("network", "rm", net, check=False)
        subprocess.run(["rm", "-rf", tmp])
    atexit.register(cleanup)
    used = set()
    for nid in docker("network", "ls", "-q").stdout.split():
        for cfg in json.loads(docker("network", "inspect", nid).stdout)[0]["IPAM"]["Config"] or []:
            used.add(".".join(cfg.get("Subnet", "").split(".")[:2]))
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    used |= set(re.findall(r"^(\d+\.\d+)\.", routes, re.M))
    prefix = next(f"10.{n}" for n in range(251, 200, -1) if f"10.{n}" not in used)
    subnet = f"{prefix}.0.0/24"
    docker("network", "create", "--subnet", subnet, net)
    hosts = list(ipaddress.ip_network(subnet).hosts())
    next_ip = iter(hosts[10:])

    # The Secret volume, as the kubelet writes it.
    sec_vol = next(v for v in pod["volumes"] if v["name"] == "secrets")
    sec_dir = os.path.join(tmp, "secret")
    os.makedirs(sec_dir)
    for item in sec_vol["secret"]["items"]:
        path = os.path.join(sec_dir, item["path"])
        with open(path, "w") as f:
            f.write(secret_values[item["key"]])
        os.chmod(path, 0o444)  # defaultMode 0440 with the pod's fsGroup; Docker has no fsGroup

    def env_of(name, ip):
        env = {}
        for e in c["env"]:
            if "value" in e:
                v = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
            else:
                src = e["valueFrom"]
                if "fieldRef" in src:
                    v = {"metadata.name": name, "metadata.namespace": NS,
                         "status.podIP": ip}[src["fieldRef"]["fieldPath"]]
                else:
                    v = secret_values[src["secretKeyRef"]["key"]]
            env[e["name"]] = v
        return env

    def run_pod(i, ip):
        name = f"charon-{i}"
        cname = f"{tag}-{name}"
        sc, psc = c["securityContext"], pod["securityContext"]
        args = ["run", "-d", "--name", cname, "--hostname", name, "--network", net, "--ip", str(ip),
                "--network-alias", dns_name,
                "--user", f"{psc['runAsUser']}:{psc['runAsGroup']}", "--cap-drop", "ALL"]
        if sc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges:true"]
        for m in c["volumeMounts"]:
            if m["name"] == "secrets":
                args += ["-v", f"{sec_dir}:{m['mountPath']}:ro"]
            else:
                vol = f"{tag}-{m['name']}-{name}"
                if vol not in made["volumes"]:
                    made["volumes"].append(vol)
                args += ["-v", f"{vol}:{m['mountPath']}"]
        for k, v in env_of(name, str(ip)).items():
            args += ["-e", f"{k}={v}"]
        if cname not in made["containers"]:
            made["containers"].append(cname)
        docker(*args, IMAGE)
        return cname

    def readyz(ip):
        try:
            return urllib.request.urlopen(f"http://{ip}:{ready_port}{ready['path']}", timeout=2).status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def http_status(request):
        try:
            return urllib.request.urlopen(request, timeout=5).status
        except urllib.error.HTTPError as e:
            return e.code

    def wait(what, cond, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = cond()
            if r:
                return r
            time.sleep(0.5)
        raise SystemExit(f"FAILED: {what} within {timeout}s")

    def members(cname):
        p = docker("exec", cname, "charonctl", "cluster", "status", "-o", "json", check=False)
        return json.loads(p.stdout) if p.returncode == 0 else None

    try:
        ips = [next(next_ip) for _ in range(3)]
        names = [run_pod(i, ip) for i, ip in enumerate(ips)]
        t0 = time.monotonic()
        wait("3 pods ready (readinessProbe)", lambda: all(readyz(ip) == 200 for ip in ips))

        def converged():
            s = members(names[0])
            return s and s["converged"] and sum(m["live"] for m in s["members"]) == 3
        wait("3 live members, converged (seeds through the headless name)", converged)
        print(f"3 pods ready and converged in {time.monotonic() - t0:.1f}s, "
              f"seeded only by the headless name {dns_name}:7946")
        p = docker("exec", names[0], "charonctl", "host", "add", "k8s.example", "--upstream",
                   "http://127.0.0.1:9", "--wait")
        print(f"charonctl inside charon-0 (token from the Secret): {p.stderr.strip()}")

        # Any pod reaches the admin port: without the token, /drain is
        # refused and charon-1 stays ready.
        admin = f"http://{ips[1]}:{ports['admin']}/drain"
        for method, headers in (("GET", {}), ("POST", {}), ("POST", {"Authorization": "Bearer wrong"})):
            status = http_status(urllib.request.Request(admin, method=method, headers=headers))
            if status not in (401, 405):
                raise SystemExit(f"FAILED: {method} /drain {headers} answered {status}")
        if readyz(ips[1]) != 200:
            raise SystemExit("FAILED: charon-1 is not ready after refused /drain requests")
        print("/drain without the admin token: refused (405 for GET, 401 for POST); charon-1 still ready")

        # Stop charon-1 as the kubelet would: preStop sleep (if any), then
        # SIGTERM with what is left of the grace period.
        t = time.monotonic()
        time.sleep(pre_stop)
        docker("stop", "-t", str(grace - pre_stop), names[1], timeout=grace + 30)
        took = time.monotonic() - t
        code = docker("inspect", "-f", "{{.State.ExitCode}}", names[1]).stdout.strip()
        print(f"charon-1 stopped in {took:.1f}s (preStop {pre_stop}s + SIGTERM drain), exit {code}, "
              f"terminationGracePeriodSeconds {grace}")
        if code != "0" or took >= grace:
            raise SystemExit("FAILED: the pod did not drain and exit 0 within the grace period")

        # Recreated with a new IP on the same volume: rejoins.
        docker("rm", "-v", names[1])
        new_ip = next(next_ip)
        run_pod(1, new_ip)
        t = time.monotonic()
        wait("charon-1 ready again with a new IP", lambda: readyz(new_ip) == 200)

        def rejoined():
            s = members(names[0])
            if not s:
                return False
            live = [m for m in s["members"] if m["live"]]
            return s["converged"] and len(live) == 3 and any(
                m["name"] == "charon-1" and m["api_address"].startswith(str(new_ip)) for m in live)
        wait("charon-1 live again at its new address, converged", rejoined)
        shown = docker("exec", names[1], "charonctl", "host", "show", "k8s.example", check=False)
        if shown.returncode != 0:
            raise SystemExit("FAILED: charon-1 lost its store across the re-creation")
        print(f"charon-1 recreated at {new_ip} on its volume: ready, rejoined and converged in "
              f"{time.monotonic() - t:.1f}s, store kept")
        print("PASSED: the StatefulSet's pod spec runs as written")
    finally:
        cleanup()
        atexit.unregister(cleanup)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("interrupted"))
    main()
