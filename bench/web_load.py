"""Load on the web page: concurrent generate requests against a real `ddpmkit serve` on loopback,
while a light request (the forward-process tab) must keep answering.

    python bench/web_load.py --runs runs/demo               # 8 requests, then checks and figures
    python bench/web_load.py --runs runs/demo --requests 8 --steps 20 --n 4 --concurrency 1

It starts the server as a subprocess, sends the generate requests at once through gradio's own
client (real HTTP and the real queue), and calls the forward-process endpoint every --poll
seconds until they are done. Then it checks every result against `generate` run here with the
same settings (correct) and against each other (distinct, so no request got another's images),
and prints per-request times and the forward-process latencies. Bounded: --requests at most 32,
--timeout seconds in all.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import numpy as np
import torch
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs: list[str], port: int, concurrency: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "ddpmkit.cli", "serve", *runs, "--port", str(port), "--concurrency", str(concurrency)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                sys.exit(f"the server did not start; see {log}")
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["runs/demo"], help="run folders to serve; the first one is used")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="images per request")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m_sde")
    ap.add_argument("--condition", default="", help="class or prompt, for a conditional first run")
    ap.add_argument("--concurrency", type=int, default=1, help="the server's --concurrency")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between forward-process requests")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default="runs/bench/web_load.log", help="the server's log")
    args = ap.parse_args()
    if not 1 <= args.requests <= 32:
        sys.exit("--requests must lie in 1..32")
    from gradio_client import Client

    from ddpmkit.models import load_diffusion
    from ddpmkit.pipelines.generate import generate
    from ddpmkit.sampling.options import sampler_options
    from ddpmkit.web.actions import Actions, picture
    from ddpmkit.web.shelf import Shelf, find_runs

    run = find_runs(args.runs[:1])[0]
    log = Path(args.out)
    log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_server(args.runs, port, args.concurrency, log)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        seeds = [1000 + 17 * k for k in range(args.requests)]
        client.predict(None, 7, "linear", 0.0, api_name="/forward")  # the page is open before the rush (not counted)
        t0 = time.perf_counter()
        jobs = [client.submit(run, args.condition, 3.0, args.sampler, args.steps, "default", seed, args.n, api_name="/generate")
                for seed in seeds]
        latencies = []
        while not all(j.done() for j in jobs):
            if time.perf_counter() - t0 > args.timeout:
                sys.exit(f"timed out after {args.timeout:.0f}s")
            s = time.perf_counter()
            client.predict(None, 7, "linear", float(len(latencies) * 37 % 1000), api_name="/forward")
            latencies.append(time.perf_counter() - s)
            time.sleep(args.poll)
        with ThreadPoolExecutor(len(jobs)) as pool:
            outputs = list(pool.map(lambda j: j.result(timeout=args.timeout), jobs))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    m = load_diffusion(run)
    shown = [np.asarray(Image.open(out[2])) for out in outputs]
    request = Actions(Shelf([run])).request(m, args.condition, 3.0)[0]  # the page's own reading of the condition
    correct = []
    for seed, image, out in zip(seeds, shown, outputs):
        here = generate(m, args.n, request, args.sampler, args.steps, seed, sampler_options(args.sampler), progress=False)
        correct.append(np.array_equal(image, picture(here.images)) and int(out[3]) == seed)
    distinct = len({im.tobytes() for im in shown}) == len(shown)
    print(f"{args.requests} generate requests ({args.n} images x {args.steps} steps of {args.sampler}, server concurrency "
          f"{args.concurrency}) on {run}: all done in {wall:.1f}s")
    print(f"results correct (= generate with the same seed, run here): {sum(correct)}/{len(correct)}; "
          f"pairwise distinct: {distinct}")
    lat = sorted(latencies)
    print(f"forward-process requests while they ran: {len(lat)}, latency median {statistics.median(lat) * 1000:.0f} ms, "
          f"max {lat[-1] * 1000:.0f} ms, within 1 s: {sum(x < 1.0 for x in lat)}/{len(lat)}")
    if not (all(correct) and distinct and lat[-1] < 1.0):
        sys.exit("FAILED: see the figures above")


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    main()
