"""Two tiers against durable-only checkpointing: the loop's blocking per save, and the work lost at a kill.

One training loop (a fixed step time, spent in ``time.sleep`` as an accelerator's compute would leave
the CPU free) saves the same state asynchronously under three configurations, one after the other:

- ``two_tiers``: a local tier every ``L`` steps (in ``/dev/shm`` where there is one, else the system's
  temporary directory; ``--local`` names another), and the durable root (s3:// on a local moto server
  unless ``--durable`` names one) every ``D`` steps, promoted from the local copy;
- ``durable_every_D``: the durable root alone, every ``D`` steps (the same durable cadence and cost);
- ``durable_continuous``: the durable root alone, whenever no save is in flight (as often as uploads allow).

Blocking is the time each ``save_async`` call of a step that saved took. The work lost at a kill
is computed from the run's own timeline for 2,000 kill times drawn uniformly over the loop: the
steps begun before the kill minus the newest step committed before it (a process kill keeps the
local tier; ``machine lost`` counts the durable tier only). A promoted step counts as local from its
durable commit (an overestimate of the two-tier loss by at most one promotion).

    python benchmarks/tiers.py            # 32 MiB state, 200 steps of 50 ms, L=5, D=50
    python benchmarks/tiers.py --tiny     # 1 MiB, 40 steps of 10 ms, L=2, D=10 (numbers mean little)
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np

import ckpt
from ckpt.training import save_decision_policies as sdp
from ckpt.training import preservation_policies as pp


def state(nbytes: int, rng: np.random.Generator) -> dict:
    """One large leaf of ``nbytes`` and 100 small ones, random (as parameters and optimizer state are)."""
    return {"params": rng.random(nbytes // 4, dtype=np.float32),
            "small": {f"b{i}": rng.random(64, dtype=np.float32) for i in range(100)}}


def run_loop(ckptr: ckpt.Checkpointer, tree: dict, *, steps: int, step_secs: float) -> dict:
    """Runs ``steps`` steps; returns the step start times, each save's blocking and each commit time."""
    starts, blocking, commits = [], [], []
    origin = time.monotonic()
    for step in range(steps):
        starts.append(time.monotonic() - origin)
        time.sleep(step_secs)
        tree["params"][:8] = step  # the step's update: every snapshot differs
        begin = time.perf_counter()
        response = ckptr.save_async(step, tree)
        if response is not None:
            blocking.append(time.perf_counter() - begin)
            response.on_complete(lambda _, s=step: commits.append((time.monotonic() - origin, s)))
    end = time.monotonic() - origin
    ckptr.wait()
    return {"starts": starts, "end": end, "blocking": blocking, "commits": sorted(commits)}


def lost_steps(timeline: dict, commits: list[tuple[float, int]], kills: list[float]) -> dict:
    """Steps lost at each kill time: the steps begun before it minus the newest committed before it."""
    times, lost = [t for t, _ in commits], []
    for kill in kills:
        begun = bisect.bisect_right(timeline["starts"], kill)
        committed = [s for _, s in commits[: bisect.bisect_right(times, kill)]]
        lost.append(begun - (max(committed) + 1 if committed else 0))
    return {"mean": statistics.fmean(lost), "p95": sorted(lost)[int(0.95 * (len(lost) - 1))], "max": max(lost)}


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"saves": len(seconds), "median_ms": 1e3 * statistics.median(ordered),
            "p90_ms": 1e3 * ordered[int(0.9 * (len(ordered) - 1))]}


def measure(durable: str, scratch: Path, *, nbytes: int, steps: int, step_secs: float, every: int,
            local_every: int) -> dict:
    rng = random.Random(0)
    results = {}
    configurations = {
        "two_tiers": dict(save_decision_policy=sdp.FixedIntervalPolicy(every),
                          local=ckpt.LocalCheckpointOptions(scratch / "local", preservation_policy=pp.LatestN(2),
                                                            save_decision_policy=sdp.FixedIntervalPolicy(local_every))),
        f"durable_every_{every}": dict(save_decision_policy=sdp.FixedIntervalPolicy(every)),
        "durable_continuous": dict(save_decision_policy=sdp.ContinuousCheckpointingPolicy()),
    }
    for name, kwargs in configurations.items():
        root = f"{durable}/{name}"
        with ckpt.Checkpointer(root, preservation_policy=pp.LatestN(2), **kwargs) as ckptr:
            timeline = run_loop(ckptr, state(nbytes, np.random.default_rng(0)), steps=steps, step_secs=step_secs)
        durable_commits = timeline["commits"] if "local" not in kwargs else [
            (t, s) for t, s in timeline["commits"] if s % every == 0]
        kills = [rng.uniform(0, timeline["end"]) for _ in range(2000)]
        results[name] = {"blocking": summary(timeline["blocking"]), "durable_steps": len(durable_commits),
                         "lost_steps_process_kill": lost_steps(timeline, timeline["commits"], kills),
                         "lost_steps_machine_lost": lost_steps(timeline, durable_commits, kills)}
    return results


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """An s3:// root on a moto server started for the run (the AWS_* environment set for tensorstore)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench")
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT"), timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield "s3://bench/tiers"
    finally:
        server.kill()
        server.wait()


def report(results: dict, config: dict) -> str:
    lines = [f"two tiers vs durable only: {config['nbytes'] >> 20} MiB state, {config['steps']} steps of "
             f"{config['step_secs'] * 1e3:.0f} ms, local every {config['local_every']} steps, durable every "
             f"{config['every']} steps (local {config['local']}, durable {config['durable']}; load average "
             f"{config['load_average']:.1f} on {os.cpu_count()} CPUs)",
             f"{'configuration':<20} {'saves':>5} {'block med':>9} {'block p90':>9} {'durable':>7} "
             f"{'lost/kill mean':>14} {'p95':>4} {'lost/machine mean':>17} {'p95':>4}"]
    for name, r in results.items():
        b, k, m = r["blocking"], r["lost_steps_process_kill"], r["lost_steps_machine_lost"]
        lines.append(f"{name:<20} {b['saves']:>5} {b['median_ms']:>7.1f}ms {b['p90_ms']:>7.1f}ms {r['durable_steps']:>7} "
                     f"{k['mean']:>14.1f} {k['p95']:>4} {m['mean']:>17.1f} {m['p95']:>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="1 MiB, 40 steps of 10 ms: a smoke run")
    parser.add_argument("--durable", help="the durable root (default: s3:// on a local moto server)")
    parser.add_argument("--local", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the local tier goes (default: /dev/shm if present, else the temporary directory)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    config = dict(nbytes=1 << 20, steps=40, step_secs=0.01, every=10, local_every=2) if args.tiny else dict(
        nbytes=32 << 20, steps=200, step_secs=0.05, every=50, local_every=5)
    with tempfile.TemporaryDirectory(prefix="ckpt-tiers-", dir=args.local) as scratch, \
            (contextlib.nullcontext(args.durable) if args.durable else moto_s3()) as durable:
        results = measure(durable, Path(scratch), **config)
    config.update(durable=durable, local=args.local or tempfile.gettempdir(), load_average=os.getloadavg()[0])
    print(report(results, config))
    if args.out:
        Path(args.out).write_text(json.dumps({"config": config, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
