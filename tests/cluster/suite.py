#!/usr/bin/env python3
"""Docker-based multi-region tests of deploy/docker (run them with run.sh).

Brings up the five-node, two-region compose cluster (deploy/docker/cluster.sh)
under its own project name and networks, then:

  image      the node image runs as non-root and holds nothing but what
             build.sh listed (docker export + tar listing);
  hosts      hosts added through charonctl on a `us` node are served by all
             five nodes (their own HTTP ports) and through HAProxy;
  propagation  how long a write on us1 takes to be served in eu (with the
             router's WAN delay when the kernel has tc netem);
  partition  us cut from eu (docker network disconnect), writes on both
             sides incl. a conflicting edit and an edit-vs-delete of the same
             hosts, heal: every node converges to the same state and winner;
  kill       `docker kill` of a node during writes, restart: nothing that was
             acknowledged is lost, on any node;
  rolling    deploy/rolling-restart.sh over all five nodes under HTTP and
             WebSocket load through HAProxy: no failed request, every
             WebSocket close is 1001;
  down       `cluster.sh down -v` leaves no container, network or volume.

Exits 1 when any check failed, 0 otherwise; prints the measured numbers.
Needs: Python 3.9+ with `websockets` (the repo's .venv), docker, jq, the
charonctl binary (--charonctl), the images (run.sh builds them).
"""

import argparse
import asyncio
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOCKER_DIR = os.path.join(REPO, "deploy", "docker")
CLUSTER_SH = os.path.join(DOCKER_DIR, "cluster.sh")
ROLLING_SH = os.path.join(REPO, "deploy", "rolling-restart.sh")
NODES = ["eu1", "eu2", "eu3", "us1", "us2"]
REGION = {"eu1": "eu", "eu2": "eu", "eu3": "eu", "us1": "us", "us2": "us"}
# Ports of the lb container (haproxy.cfg): one node each.
API_PORT = {n: 7071 + i for i, n in enumerate(NODES)}
HTTP_PORT = {n: 8081 + i for i, n in enumerate(NODES)}
ADMIN_PORT = {n: 9091 + i for i, n in enumerate(NODES)}
LB_HTTP = 8080


class Fail(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def now():
    return time.monotonic()


def eventually(what, timeout, fn, interval=0.25):
    """Polls fn() until it returns a truthy value (returned) or raises Fail
    after `timeout` seconds with the last reason fn gave (via Fail)."""
    deadline = now() + timeout
    last = "no answer yet"
    while True:
        try:
            v = fn()
            if v:
                return v
        except Fail as e:
            last = str(e)
        if now() > deadline:
            raise Fail(f"{what}: not within {timeout:.0f}s: {last}")
        time.sleep(interval)


def run(cmd, timeout=60, check=True, env=None, input=None):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and p.returncode != 0:
        raise Fail(f"{' '.join(cmd)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[:500]}")
    return p


def docker(*args, timeout=60, check=True):
    return run(["docker", *args], timeout=timeout, check=check)


class Suite:
    def __init__(self, args):
        self.args = args
        self.project = args.project or f"charontest{os.getpid() % 100000}"
        self.net = None
        self.tmp = tempfile.mkdtemp(prefix="charon-cluster-test-")
        self.secrets = os.path.join(self.tmp, "secrets")
        self.backend = None
        self.backend_port = None
        self.gateway = f"{self.project}-backend"
        self.results = []  # (name, ok, detail)
        self.numbers = {}  # name -> text
        self.netem = False
        self.wan_delay_ms = args.wan_delay_ms
        self.cluster_up = False

    # ---------------------------------------------------------------- env

    def pick_net(self):
        used = set()
        ids = docker("network", "ls", "-q").stdout.split()
        if ids:
            out = docker("network", "inspect", "-f",
                         "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids).stdout
            for subnet in out.split():
                used.add(".".join(subnet.split(".")[:2]))
        routes = run(["ip", "-4", "route"], check=False).stdout if shutil_which("ip") else ""
        for m in re.finditer(r"(\d+\.\d+)\.\d+\.\d+", routes):
            used.add(m.group(1))
        for second in random.sample(range(200, 250), 50):
            prefix = f"10.{second}"
            if prefix not in used:
                return prefix
        raise Fail("no free 10.x.0.0/16 prefix for the test networks")

    def env(self):
        e = dict(os.environ)
        e.update({
            "CHARON_PROJECT": self.project,
            "CHARON_NET": self.net,
            "CHARON_PUBLISH": "0",
            "CHARON_SECRETS_DIR": self.secrets,
            "CHARON_WAN_DELAY_MS": str(self.wan_delay_ms),
            "CHARON_UP_TIMEOUT": "180",
            "CHARON_LOG": "info",
        })
        return e

    def cluster(self, *args, timeout=300, check=True):
        return run([CLUSTER_SH, *args], timeout=timeout, check=check, env=self.env())

    @property
    def lb(self):
        return f"{self.net}.0.2"

    @property
    def token_file(self):
        return os.path.join(self.secrets, "admin.token")

    def container(self, node):
        return f"{self.project}-{node}"

    # ---------------------------------------------------------------- clients

    def ctl(self, node, *args, timeout=30, check=True):
        cmd = [self.args.charonctl, "--endpoint", f"http://{self.lb}:{API_PORT[node]}",
               "--token-file", self.token_file, *args]
        return run(cmd, timeout=timeout, check=check)

    def ctl_json(self, node, *args, timeout=30):
        p = self.ctl(node, *args, "-o", "json", timeout=timeout)
        try:
            return json.loads(p.stdout)
        except json.JSONDecodeError:
            raise Fail(f"{node}: {' '.join(args)}: not JSON: {p.stdout[:200]}")

    def http(self, port, host, path="/", timeout=5):
        """(status, body) of one GET to the lb on `port` with Host `host`."""
        c = http.client.HTTPConnection(self.lb, port, timeout=timeout)
        try:
            c.request("GET", path, headers={"Host": host})
            r = c.getresponse()
            return r.status, r.read().decode(errors="replace")
        finally:
            c.close()

    def members(self, node):
        return {m["name"]: m for m in self.ctl_json(node, "cluster", "members", timeout=10)}

    def converged(self, via, live=5):
        s = self.ctl_json(via, "cluster", "status", timeout=10)
        n_live = sum(1 for m in s["members"] if m["live"])
        if not s["converged"] or n_live != live:
            raise Fail(f"via {via}: converged={s['converged']}, {n_live} live")
        return s

    def hosts_on(self, node):
        """The host records of `node`, by first domain (JSON-canonical)."""
        hosts = self.ctl_json(node, "host", "list", timeout=15)
        return {h["domains"][0]: h for h in hosts}

    def backend_stats(self):
        c = http.client.HTTPConnection(self.backend_host, self.backend_port, timeout=5)
        try:
            c.request("GET", "/__stats")
            return json.loads(c.getresponse().read())
        finally:
            c.close()

    # ---------------------------------------------------------------- steps

    def step(self, name, fn):
        log(f"== {name}")
        t0 = now()
        try:
            fn()
        except Fail as e:
            self.results.append((name, False, str(e)))
            log(f"FAIL {name}: {e}")
            return False
        except Exception as e:  # a bug in the test or an unexpected tool error
            self.results.append((name, False, f"{type(e).__name__}: {e}"))
            log(f"FAIL {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
            return False
        self.results.append((name, True, f"{now() - t0:.1f}s"))
        log(f"PASS {name} ({now() - t0:.1f}s)")
        return True

    def up(self):
        self.net = self.pick_net()
        log(f"project {self.project}, networks {self.net}.{{0,1,2}}.0/24, "
            f"WAN delay {self.wan_delay_ms} ms one way")
        t0 = now()
        self.cluster_up = True
        p = self.cluster("up", timeout=400)
        sys.stdout.write(p.stdout)
        up_s = now() - t0
        router_log = docker("logs", self.container("router")).stdout
        self.netem = "(netem)" in router_log and "netem unavailable" not in router_log
        if not self.netem:
            reason = next((l for l in router_log.splitlines() if "netem unavailable" in l), "no netem line")
            log(f"NOTE: WAN delay not injected: {reason}")
        self.numbers["cluster up (compose up to 5 live, converged, in the lb)"] = f"{up_s:.1f} s"
        self.numbers["WAN delay injected"] = (
            f"yes: {self.wan_delay_ms} ms one way (tc netem on the router)" if self.netem
            else "NO: this kernel has no sch_netem (tc: 'Specified qdisc kind is unknown'); "
                 "regions joined by the router without added delay")
        # The upstream: backend.py on the host (edge gateway address), reached
        # from both regions through a TCP relay container named `backend`.
        self.backend_host = f"{self.net}.0.1"
        self.backend = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(__file__), "backend.py"),
             "--host", self.backend_host], stdout=subprocess.PIPE, text=True)
        line = self.backend.stdout.readline()
        if not line.startswith("LISTENING "):
            raise Fail(f"backend did not start: {line!r}")
        self.backend_port = int(line.split()[1])
        cfg = os.path.join(self.tmp, "relay.cfg")
        with open(cfg, "w") as f:
            f.write("global\n    maxconn 2000\ndefaults\n    mode tcp\n    timeout connect 2s\n"
                    "    timeout client 1h\n    timeout server 1h\nlisten backend\n    bind :3000\n"
                    f"    server host {self.backend_host}:{self.backend_port}\n")
        os.chmod(cfg, 0o644)
        os.chmod(self.tmp, 0o755)
        docker("run", "-d", "--name", self.gateway, "--network", f"{self.project}_edge",
               "--ip", f"{self.net}.0.3", "--read-only", "--cap-drop", "ALL",
               "-v", f"{cfg}:/etc/haproxy/haproxy.cfg:ro",
               os.environ.get("CHARON_HAPROXY_IMAGE", "charon-haproxy:local"))
        for i, region in ((1, "eu"), (2, "us")):
            docker("network", "connect", "--ip", f"{self.net}.{i}.3", "--alias", "backend",
                   f"{self.project}_{region}", self.gateway)

    def image(self):
        image = os.environ.get("CHARON_IMAGE", "charon:local")
        info = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
        problems = []
        if info.get("User") != "10001:10001":
            problems.append(f"image user is {info.get('User')!r}, not 10001:10001")
        if "/var/lib/charon" not in (info.get("Volumes") or {}):
            problems.append("/var/lib/charon is not a volume")
        # The running nodes: their main process's uids and gids.
        for n in NODES:
            pid = docker("inspect", "-f", "{{.State.Pid}}", self.container(n)).stdout.strip()
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
            gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
            caps = re.search(r"^CapEff:\s+(\S+)", status, re.M).group(1)
            if set(uids) != {"10001"} or set(gids) != {"10001"}:
                problems.append(f"{n} runs as uid {uids} gid {gids}")
            if int(caps, 16) != 0:
                problems.append(f"{n} has capabilities {caps}")
        # The files: docker export of a container of the image.
        manifest = {}
        with open(os.path.join(REPO, "target", "docker", "node", "manifest.txt")) as f:
            for line in f:
                kind, path = line.split()
                manifest[path.lstrip("/")] = kind
        ctr = docker("create", image).stdout.strip()
        try:
            exported = subprocess.run(["docker", "export", ctr], capture_output=True, timeout=120, check=True).stdout
        finally:
            docker("rm", "-v", ctr, check=False)
        members = tarfile.open(fileobj=io.BytesIO(exported)).getmembers()
        # What Docker itself adds to every container's filesystem.
        runtime = {".dockerenv", "dev", "dev/console", "dev/pts", "dev/shm", "etc/hostname",
                   "etc/hosts", "etc/mtab", "etc/resolv.conf", "proc", "sys"}
        parents = {"/".join(p.split("/")[:i]) for p in manifest for i in range(1, p.count("/") + 1)}
        listed = []
        for m in members:
            name = m.name.rstrip("/")
            name = name[2:] if name.startswith("./") else name.lstrip("/")
            if not name:
                continue
            listed.append(name)
            kind = "d" if m.isdir() else "l" if m.issym() else "f" if m.isfile() else "?"
            if name in runtime:
                continue
            if name in manifest:
                if manifest[name] != kind:
                    problems.append(f"/{name} is a {kind}, the manifest says {manifest[name]}")
            elif not (m.isdir() and name in parents):
                problems.append(f"unexpected file in the image: /{name}")
            if m.mode & 0o6000:
                problems.append(f"/{name} is setuid/setgid")
            owner = (m.uid, m.gid)
            want = (10001, 10001) if name == "var/lib/charon" else (0, 0)
            if owner != want:
                problems.append(f"/{name} is owned by {owner}, not {want}")
        missing = set(manifest) - set(listed)
        if missing:
            problems.append(f"missing from the image: {sorted(missing)}")
        for shell in ("bin/sh", "bin/bash", "bin/busybox"):
            if shell in listed:
                problems.append(f"the image has a shell: /{shell}")
        files = sum(1 for k in manifest.values() if k == "f")
        self.numbers["node image"] = (
            f"{files} files ({', '.join(sorted(p for p, k in manifest.items() if k == 'f'))}), "
            f"user 10001, {int(json.loads(docker('image', 'inspect', image).stdout)[0]['Size']) / 1e6:.1f} MB")
        if problems:
            raise Fail("; ".join(problems))

    def hosts(self):
        upstream = "http://backend:3000"
        self.ctl("us1", "host", "add", "app.test", "--upstream", upstream, "--wait")
        for n in NODES:
            def serves(n=n):
                st, body = self.http(HTTP_PORT[n], "app.test", f"/via-{n}")
                if st != 200 or "backend ok app.test" not in body:
                    raise Fail(f"{n}: {st} {body[:100]!r}")
                return True
            eventually(f"{n} serves app.test", 10, serves)
        ok = 0
        for i in range(20):
            st, body = self.http(LB_HTTP, "app.test", f"/lb-{i}")
            if st != 200 or "backend ok" not in body:
                raise Fail(f"through HAProxy: {st} {body[:100]!r}")
            ok += 1
        st, _ = self.http(LB_HTTP, "nope.test", "/")
        if st == 200:
            raise Fail("an unknown host got 200")
        self.numbers["hosts"] = f"app.test (added on us1) served by all 5 nodes and by HAProxy ({ok}/20 ok)"

    def propagation(self):
        rounds = self.args.propagation_rounds
        waited = []  # --wait figure, ms
        seen = {n: [] for n in NODES}  # ms from issuing the write to the first 200
        write_ms = []
        for i in range(rounds):
            domain = f"prop-{i}.test"
            stop = threading.Event()
            t_first = {}
            t0 = [None]

            def poll(n):
                c = None
                while not stop.is_set():
                    try:
                        if c is None:
                            c = http.client.HTTPConnection(self.lb, HTTP_PORT[n], timeout=5)
                        c.request("GET", "/", headers={"Host": domain})
                        r = c.getresponse()
                        r.read()
                        if r.status == 200 and t0[0] is not None:
                            t_first[n] = now()
                            return
                        if r.getheader("Connection", "").lower() == "close":
                            c.close()
                            c = None
                    except (OSError, http.client.HTTPException):
                        if c:
                            c.close()
                        c = None
                    time.sleep(0.002)

            threads = [threading.Thread(target=poll, args=(n,), daemon=True) for n in NODES]
            for t in threads:
                t.start()
            time.sleep(0.2)  # pollers connected and seeing 404s
            t0[0] = now()
            p = self.ctl("us1", "host", "add", domain, "--upstream", "http://backend:3000", "--wait")
            write_ms.append((now() - t0[0]) * 1000)
            m = re.search(r"replicated to (\d+) live nodes? in (\d+) ms", p.stderr)
            if not m or m.group(1) != "5":
                raise Fail(f"{domain}: --wait said {p.stderr.strip()!r}")
            waited.append(int(m.group(2)))
            for t in threads:
                t.join(10)
            stop.set()
            for n in NODES:
                if n not in t_first:
                    raise Fail(f"{domain}: {n} did not serve it within 10 s")
                seen[n].append((t_first[n] - t0[0]) * 1000)

        def fmt(xs):
            return f"median {statistics.median(xs):.0f} ms, min {min(xs):.0f}, max {max(xs):.0f}"

        eu = [x for n in NODES if REGION[n] == "eu" for x in seen[n]]
        us = [x for n in NODES if REGION[n] == "us" for x in seen[n]]
        self.numbers["propagation us1 -> all (charonctl --wait report)"] = f"{fmt(waited)} ({rounds} writes)"
        self.numbers["propagation us1 -> served by eu nodes (client side)"] = fmt(eu)
        self.numbers["propagation us1 -> served by us nodes (client side)"] = fmt(us)
        self.numbers["write round trip (charonctl host add --wait, us1)"] = fmt(write_ms)
        if self.netem and min(eu) < self.wan_delay_ms:
            raise Fail(f"eu nodes served a us write after {min(eu):.0f} ms, "
                       f"less than the {self.wan_delay_ms} ms WAN delay: is netem working?")

    def partition(self):
        up = "http://backend:3000"
        self.ctl("us1", "host", "add", "conflict.test", "--upstream", up, "--name", "conflict-before", "--wait")
        self.ctl("us1", "host", "add", "edit-vs-delete.test", "--upstream", up, "--wait")
        eventually("converged before the partition", 30, lambda: self.converged("eu1"))
        t_cut = now()
        self.cluster("partition")
        try:
            def split():
                eu_view, us_view = self.members("eu1"), self.members("us1")
                bad = [n for n in NODES if eu_view[n]["live"] != (REGION[n] == "eu")]
                bad += [n for n in NODES if us_view[n]["live"] != (REGION[n] == "us")]
                if bad:
                    raise Fail(f"not yet split as seen from eu1/us1: {bad}")
                return True
            eventually("each side sees the other dead", 90, split, interval=0.5)
            detect_s = now() - t_cut
            # Writes on both sides; the same host edited on both (us last).
            for i in range(3):
                self.ctl("eu1", "host", "add", f"part-eu-{i}.test", "--upstream", up)
                self.ctl("us2", "host", "add", f"part-us-{i}.test", "--upstream", up)
            self.ctl("eu2", "host", "update", "conflict.test", "--name", "conflict-from-eu")
            self.ctl("us2", "host", "update", "edit-vs-delete.test", "--name", "edited-in-us")
            time.sleep(0.05)  # the later edit must have a later clock; same host clock here
            self.ctl("us1", "host", "update", "conflict.test", "--name", "conflict-from-us")
            self.ctl("eu3", "host", "rm", "edit-vs-delete.test")
            # Really apart: each side has its writes only.
            h_eu3, h_us2 = self.hosts_on("eu3"), self.hosts_on("us2")
            if "part-us-0.test" in h_eu3 or "part-eu-0.test" in h_us2:
                raise Fail("writes crossed the partition")
            if h_eu3["conflict.test"]["name"] != "conflict-from-eu" or \
                    h_us2["conflict.test"]["name"] != "conflict-from-us":
                raise Fail("each side should see its own edit of conflict.test during the partition")
            if "edit-vs-delete.test" in h_eu3 or h_us2["edit-vs-delete.test"]["name"] != "edited-in-us":
                raise Fail("each side should see its own edit-vs-delete.test during the partition")
            # A node stopped while its peers across the WAN are unreachable
            # still drains and exits 0 (peers' connections must not hold it).
            t_stop = now()
            docker("stop", "-t", "60", self.container("us2"), timeout=90)
            stop_s = now() - t_stop
            code = docker("inspect", "-f", "{{.State.ExitCode}}", self.container("us2")).stdout.strip()
            self.numbers["partition: docker stop of us2 while cut off"] = f"{stop_s:.1f} s, exit {code}"
            if code != "0" or stop_s > 45:
                raise Fail(f"us2 stopped during the partition in {stop_s:.1f}s with exit {code}")
            docker("start", self.container("us2"))

            def us2_ready():
                st, _ = self.http(ADMIN_PORT["us2"], "x", "/readyz", timeout=2)
                if st != 200:
                    raise Fail(f"us2 /readyz {st}")
                return True
            eventually("us2 back during the partition", 60, us2_ready)
        finally:
            t_heal = now()
            self.cluster("heal")
        # Converged: cluster status on both sides, and the same hosts on all five.
        state = {}

        def same():
            self.converged("eu1")
            self.converged("us1")
            for n in NODES:
                state[n] = self.hosts_on(n)
            ref = json.dumps(state["eu1"], sort_keys=True)
            diff = [n for n in NODES if json.dumps(state[n], sort_keys=True) != ref]
            if diff:
                raise Fail(f"host lists differ from eu1's on {diff}")
            return True
        eventually("converged after healing", 120, same, interval=0.5)
        heal_s = now() - t_heal
        shows = {n: self.ctl_json(n, "host", "show", "conflict.test") for n in NODES}
        if len({json.dumps(v, sort_keys=True) for v in shows.values()}) != 1:
            raise Fail(f"host show conflict.test differs: {shows}")
        winner = shows["eu1"]["name"]
        hosts = state["eu1"]
        missing = [d for d in [f"part-{s}-{i}.test" for s in ("eu", "us") for i in range(3)] if d not in hosts]
        if missing:
            raise Fail(f"writes lost in the partition: {missing}")
        self.numbers["partition: detection (both sides see the other dead)"] = f"{detect_s:.1f} s"
        self.numbers["partition: heal -> converged, same hosts on all 5"] = f"{heal_s:.1f} s"
        self.numbers["partition: conflicting edit winner"] = (
            f"{winner!r} on all 5 nodes (eu edit first, us edit 50 ms later; version {shows['eu1']['version']})")
        self.numbers["partition: edit (us) vs later delete (eu)"] = (
            "deleted on all 5" if "edit-vs-delete.test" not in hosts
            else f"kept as {hosts['edit-vs-delete.test']['name']!r} on all 5")
        if winner != "conflict-from-us":
            raise Fail(f"the later edit (us) should win (last writer wins), got {winner!r}")
        if "edit-vs-delete.test" in hosts:
            raise Fail("the later delete (eu) should win over the earlier edit (us)")

    def kill(self):
        victim, other = "eu2", "us2"
        acked = {victim: [], other: []}
        failed = {victim: 0, other: 0}
        stop = threading.Event()
        phase = ["before"]
        acked_when = {}

        def writer(node):
            i = 0
            while not stop.is_set():
                i += 1
                d = f"kill-{node}-{i:04d}.test"
                p = self.ctl(node, "host", "add", d, "--upstream", "http://backend:3000", timeout=20, check=False)
                if p.returncode in (0, 4):
                    acked[node].append(d)
                    acked_when[d] = phase[0]
                else:
                    failed[node] += 1

        threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in (victim, other)]
        for t in threads:
            t.start()
        time.sleep(3)
        old_gen = self.members(other)[victim]["generation"]
        docker("kill", self.container(victim))
        phase[0] = "down"
        t_kill = now()
        state = docker("inspect", "-f", "{{.State.Status}} {{.RestartCount}}", self.container(victim)).stdout.strip()
        time.sleep(3)
        docker("start", self.container(victim))
        phase[0] = "after"
        t_start = now()

        def ready():
            st, _ = self.http(ADMIN_PORT[victim], "x", "/readyz", timeout=2)
            if st != 200:
                raise Fail(f"/readyz {st}")
            return True
        eventually(f"{victim} ready again", 60, ready)
        ready_s = now() - t_start
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(30)

        def caught_up():
            m = self.members(other)[victim]
            if m["generation"] == old_gen or not m["live"]:
                raise Fail(f"{victim} not live in a new generation yet")
            self.converged(other)
            return True
        eventually(f"{victim} back and converged", 60, caught_up)
        converged_s = now() - t_start
        lost = {}
        for n in NODES:
            have = self.hosts_on(n)
            gone = [d for node in acked for d in acked[node] if d not in have]
            if gone:
                lost[n] = gone
        n_before = sum(1 for d in acked[victim] if acked_when[d] == "before")
        n_after = sum(1 for d in acked[victim] if acked_when[d] == "after")
        self.numbers["kill: writes acknowledged"] = (
            f"{victim}: {n_before} before the kill + {n_after} after the restart "
            f"({failed[victim]} refused while down); {other}: {len(acked[other])} ({failed[other]} failed)")
        self.numbers["kill: container right after docker kill (status, restarts)"] = state
        self.numbers["kill: docker start -> /readyz 200"] = f"{ready_s:.1f} s"
        self.numbers["kill: docker start -> live (new generation) + converged"] = f"{converged_s:.1f} s"
        self.numbers["kill: acknowledged writes lost"] = (
            "0 on every node" if not lost else json.dumps({n: len(v) for n, v in lost.items()}))
        if not n_before:
            raise Fail(f"no write to {victim} was acknowledged before the kill")
        if failed[other]:
            raise Fail(f"{failed[other]} writes to {other} (not killed) failed")
        if lost:
            raise Fail(f"acknowledged writes lost: { {n: v[:5] for n, v in lost.items()} }")

    def rolling(self):
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        stop = threading.Event()
        lock = threading.Lock()
        http_stats = {"ok": 0, "failed": 0, "errors": [], "max_ms": 0.0}
        ws_stats = {"sessions": 0, "messages": 0, "closes": {}, "failures": [], "open": 0}
        before = self.backend_stats()

        def http_load():
            c = None
            i = 0
            while not stop.is_set():
                i += 1
                t = now()
                try:
                    if c is None:
                        c = http.client.HTTPConnection(self.lb, LB_HTTP, timeout=10)
                    c.request("GET", f"/load/{i}", headers={"Host": "app.test"})
                    r = c.getresponse()
                    body = r.read().decode(errors="replace")
                    ok = r.status == 200 and body.startswith("backend ok app.test")
                    err = None if ok else f"{r.status} {body[:80]!r}"
                    if r.getheader("Connection", "").lower() == "close":
                        c.close()
                        c = None
                except (OSError, http.client.HTTPException) as e:
                    ok, err = False, f"{type(e).__name__}: {e}"
                    if c:
                        c.close()
                    c = None
                with lock:
                    if ok:
                        http_stats["ok"] += 1
                        http_stats["max_ms"] = max(http_stats["max_ms"], (now() - t) * 1000)
                    else:
                        http_stats["failed"] += 1
                        if len(http_stats["errors"]) < 20:
                            http_stats["errors"].append(err)
                time.sleep(0.01)

        async def ws_client(idx):
            seq = 0
            while not stop.is_set():
                try:
                    async with connect(f"ws://app.test:{LB_HTTP}/ws/{idx}", host=self.lb, port=LB_HTTP,
                                       proxy=None, open_timeout=10, close_timeout=10,
                                       ping_interval=None, compression=None) as ws:
                        with lock:
                            ws_stats["sessions"] += 1
                            ws_stats["open"] += 1
                        try:
                            while not stop.is_set():
                                seq += 1
                                msg = f"{idx}:{seq}"
                                await ws.send(msg)
                                reply = await asyncio.wait_for(ws.recv(), 10)
                                if reply != msg:
                                    raise Fail(f"echo {reply!r} != {msg!r}")
                                with lock:
                                    ws_stats["messages"] += 1
                                await asyncio.sleep(0.25)
                        finally:
                            with lock:
                                ws_stats["open"] -= 1
                except ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd else None
                    with lock:
                        ws_stats["closes"][code] = ws_stats["closes"].get(code, 0) + 1
                        if code != 1001:
                            ws_stats["failures"].append(f"ws {idx}: closed with {code} ({e})")
                except (OSError, asyncio.TimeoutError, InvalidHandshake, Fail) as e:
                    with lock:
                        ws_stats["failures"].append(f"ws {idx}: {type(e).__name__}: {e}")
                    await asyncio.sleep(0.2)

        def ws_load():
            async def main():
                await asyncio.gather(*(ws_client(i) for i in range(self.args.ws_clients)))
            asyncio.run(main())

        threads = [threading.Thread(target=http_load, daemon=True) for _ in range(self.args.http_clients)]
        threads.append(threading.Thread(target=ws_load, daemon=True))
        for t in threads:
            t.start()
        def all_open():
            if ws_stats["open"] < self.args.ws_clients:
                raise Fail(f"{ws_stats['open']} of {self.args.ws_clients} open; {ws_stats['failures'][:3]}")
            return True
        eventually("WebSocket clients connected", 30, all_open)
        time.sleep(2)
        env = dict(os.environ, CHARONCTL=self.args.charonctl)
        t0 = now()
        p = subprocess.run(
            [ROLLING_SH, "--endpoint", f"http://{self.lb}:{API_PORT['eu1']}",
             "--endpoint", f"http://{self.lb}:{API_PORT['us1']}", "--token-file", self.token_file,
             "--deadline", "5s", "--spread", "2s", "--timeout", "3m",
             "--restart-cmd", f"docker restart -t 60 {self.project}-{{node}}", *NODES],
            capture_output=True, text=True, timeout=20 * 60, env=env)
        roll_s = now() - t0
        time.sleep(3)  # load on the restarted cluster
        stop.set()
        for t in threads:
            t.join(30)
        after = self.backend_stats()
        lines = [l for l in p.stdout.splitlines() if l.strip()]
        for l in lines:
            log(f"rolling-restart: {l}")
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-3000:])
            raise Fail(f"rolling-restart.sh exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
        backend_closes = {k: v - before["ws_close_codes"].get(k, 0) for k, v in after["ws_close_codes"].items()}
        self.numbers["rolling restart: total (rolling-restart.sh)"] = f"{roll_s:.1f} s for 5 nodes"
        for l in lines:
            if ": restarted in " in l:
                node, rest = l.split(": ", 1)
                self.numbers[f"rolling restart: {node}"] = rest
        self.numbers["rolling restart: HTTP through HAProxy"] = (
            f"{http_stats['ok']} ok, {http_stats['failed']} failed, slowest {http_stats['max_ms']:.0f} ms "
            f"({self.args.http_clients} clients)")
        self.numbers["rolling restart: WebSocket through HAProxy"] = (
            f"{ws_stats['sessions']} sessions ({self.args.ws_clients} clients reconnecting), "
            f"{ws_stats['messages']} echoes, closes by code {ws_stats['closes']}, "
            f"{len(ws_stats['failures'])} failures")
        self.numbers["rolling restart: closes seen by the upstream"] = json.dumps(backend_closes)
        problems = []
        if http_stats["failed"]:
            problems.append(f"{http_stats['failed']} HTTP requests failed: {http_stats['errors'][:5]}")
        if ws_stats["failures"]:
            problems.append(f"WebSocket failures: {ws_stats['failures'][:5]}")
        if not ws_stats["closes"].get(1001):
            problems.append("no WebSocket was closed with 1001: did the drains close tunnels?")
        if problems:
            raise Fail("; ".join(problems))

    def down(self):
        self.stop_helpers()
        self.cluster("down", "-v", timeout=300)
        self.cluster_up = False
        left = []
        for kind in ("container", "network", "volume"):
            out = docker(kind, "ls", "-q" if kind != "container" else "-aq",
                         "--filter", f"label=com.docker.compose.project={self.project}").stdout.split()
            left += [f"{kind} {x}" for x in out]
        if left:
            raise Fail(f"left behind: {left}")

    # ---------------------------------------------------------------- cleanup

    def stop_helpers(self):
        docker("rm", "-f", "-v", self.gateway, check=False)
        if self.backend and self.backend.poll() is None:
            self.backend.terminate()
            try:
                self.backend.wait(10)
            except subprocess.TimeoutExpired:
                self.backend.kill()

    def cleanup(self):
        try:
            self.stop_helpers()
            if self.cluster_up:
                if self.args.keep:
                    log(f"--keep: leaving project {self.project} up (secrets in {self.secrets})")
                    return
                self.cluster("down", "-v", timeout=300, check=False)
        finally:
            if not self.args.keep:
                subprocess.run(["rm", "-rf", self.tmp])


def shutil_which(cmd):
    import shutil
    return shutil.which(cmd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--charonctl", required=True)
    ap.add_argument("--wan-delay-ms", type=int, default=50)
    ap.add_argument("--propagation-rounds", type=int, default=10)
    ap.add_argument("--http-clients", type=int, default=4)
    ap.add_argument("--ws-clients", type=int, default=16)
    ap.add_argument("--project", help="compose project name (default charontest<pid>)")
    ap.add_argument("--keep", action="store_true", help="leave the cluster up at the end")
    ap.add_argument("--only", help="comma-separated steps to run after up (image,hosts,...)")
    args = ap.parse_args()

    suite = Suite(args)

    def on_signal(signum, _frame):
        raise SystemExit(f"interrupted by signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    steps = [("image", suite.image), ("hosts", suite.hosts), ("propagation", suite.propagation),
             ("partition", suite.partition), ("kill", suite.kill), ("rolling", suite.rolling)]
    if args.only:
        wanted = set(args.only.split(","))
        steps = [s for s in steps if s[0] in wanted]
    t0 = now()
    try:
        if suite.step("up", suite.up):
            for name, fn in steps:
                suite.step(name, fn)
            if not args.keep:
                suite.step("down", suite.down)
    finally:
        suite.cleanup()
    print()
    print("== measured")
    for k, v in suite.numbers.items():
        print(f"  {k}: {v}")
    print()
    print("== results")
    for name, ok, detail in suite.results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    failed = [r for r in suite.results if not r[1]]
    print(f"\n{len(suite.results) - len(failed)} passed, {len(failed)} failed in {now() - t0:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
