"""Issue 47's figures from bench/gpu.py's JSON, as Markdown: each acceptance point with its target, its figure and
whether it is met, then the tables docs/gpu.md and the closing note quote. Runs anywhere (no GPU needed):

    .venv/bin/python bench/gpu_report.py gpu-out/gpu.json [second-call/gpu.json ...] [--tests gpu-out/test_cuda.log]

Several files (the two calls of one lent GPU session) are merged, later parts over earlier ones; they must name the same
device. A point whose part did not run (or failed) says "not measured" and why, never a guess.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TARGETS = {"demo_s": 15.0, "sampling_s": 5.0, "cifar_over_diffusers": 2.0, "of_bf16_matmul": 0.30, "judged": 0.95}


def merged(paths: list[Path]) -> dict:
    """The files' parts in one dict; part_seconds and profiles are merged key by key."""
    out: dict = {}
    for path in paths:
        figures = json.loads(path.read_text())
        if out and figures.get("device") != out.get("device"):
            raise ValueError(f"{path} was measured on {figures.get('device')!r}, the others on {out.get('device')!r}")
        for key, value in figures.items():
            if key in ("part_seconds", "profiles", "sampling", "cifar") and isinstance(value, dict):
                out.setdefault(key, {}).update(value)
            else:
                out[key] = value
    return out


def verdict(value: float | None, target: float, at_most: bool, tiny: bool = False) -> str:
    if value is None:
        return "not measured"
    if tiny:  # bench/gpu.py --tiny: toy sizes meet or miss nothing
        return "toy sizes"
    return "met" if (value <= target if at_most else value >= target) else "NOT met"


def acceptance(f: dict) -> list[tuple[str, str, str, str]]:
    """(point, target, figure, verdict) for each of the issue's GPU points."""
    rows, tiny = [], bool(f.get("tiny"))
    demo, graphed = f.get("demo", {}), f.get("demo cuda-graph", {})
    times = {"eager": demo.get("train_s"), "cuda-graph (capture included)": graphed.get("train_s_with_compile")}
    times = {k: v for k, v in times.items() if isinstance(v, (int, float))}
    best = min(times.items(), key=lambda kv: kv[1]) if times else None

    def missing(*parts: str) -> dict:  # the first of these parts that raised (bench/gpu.py went on) or was past --deadline
        said = [{"skipped": f.get("part_skipped", {}).get(p), "error": f.get("part_errors", {}).get(p)} for p in parts]
        return next((m for m in said if any(m.values())), said[0])

    figure = ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) or why_not(graphed or demo or missing("demo-graphed", "demo"))
    rows.append((f"demo preset, {demo.get('steps', 1600)} steps", f"<= {TARGETS['demo_s']:.0f} s", figure,
                 verdict(best[1] if best else None, TARGETS["demo_s"], True, tiny)))
    sampling = {k: v for k, v in f.get("sampling", {}).items() if isinstance(v.get("s"), (int, float))}
    best_s = min(sampling.items(), key=lambda kv: kv[1]["s"]) if sampling else None
    figure = ", ".join(f"{k} {v['s']:.2f} s" for k, v in sampling.items()) or why_not(missing("sampling"))
    n, steps = (best_s[1]["n"], best_s[1]["steps"]) if best_s else (500, 1000)
    rows.append((f"{n} x {steps:,} ancestral steps", f"<= {TARGETS['sampling_s']:.0f} s", figure,
                 verdict(best_s[1]["s"] if best_s else None, TARGETS["sampling_s"], True, tiny)))
    cifar = f.get("cifar", {})
    ours = {k: v for k, v in cifar.items() if k.startswith("ddpmkit") and k.endswith("/ train bf16") and "autocast-norms" not in k}
    theirs = cifar.get("diffusers / train bf16")
    if ours and theirs:
        key, row = max(ours.items(), key=lambda kv: kv[1]["images_per_s"])
        ratio = row["images_per_s"] / theirs["images_per_s"]
        rows.append(("CIFAR-10 UNet bf16 train step / diffusers' eager bf16", f">= {TARGETS['cifar_over_diffusers']:.0f}x",
                     f"x{ratio:.2f} ({key.split(' / ')[0]}: {row['images_per_s']:.0f} against {theirs['images_per_s']:.0f} images/s)",
                     verdict(ratio, TARGETS["cifar_over_diffusers"], False, tiny)))
        rows.append(("its fraction of the bf16 matmul rate", f"aim >= {TARGETS['of_bf16_matmul']:.0%}",
                     f"{row['of_bf16_matmul']:.1%} ({row['tflops']:.1f} TFLOP/s of {f.get('bf16_matmul_tflops', float('nan')):.0f})",
                     verdict(row["of_bf16_matmul"], TARGETS["of_bf16_matmul"], False, tiny)))
    else:
        errors = f.get("cifar_errors") or {}  # the cases that failed inside the part, or the part itself
        reason = f"error: {next(iter(errors))}: {why_not({'error': next(iter(errors.values()))})[7:]}" if errors else \
            why_not(missing("cifar"))
        rows.append(("CIFAR-10 UNet bf16 train step / diffusers' eager bf16", ">= 2x", reason, "not measured"))
    bf16, tf32 = cifar.get("ddpmkit / train bf16"), cifar.get("ddpmkit / train fp32/TF32")
    if bf16 and tf32:
        ratio = bf16["images_per_s"] / tf32["images_per_s"]
        rows.append(("ddpmkit's CIFAR-10 UNet: bf16 / TF32 train step (eager)", "> 1x", f"x{ratio:.2f}", verdict(ratio, 1.0 + 1e-9, False, tiny)))
    else:
        rows.append(("ddpmkit's CIFAR-10 UNet: bf16 / TF32 train step (eager)", "> 1x", "the part did not run", "not measured"))
    rows.append(judged_row(f.get("mnist_gpu", {}), missing("preset"), tiny))
    return rows


def even(judging: dict) -> bool:
    """Every digit has 5-15% of the samples (digits_quality.py's coverage target, judged there). The judge is sure of
    noise and of blank images too, each as one class, so a broken network could read 100% judged: such a judging does
    not count."""
    return judging.get("classes_even", True)


def judged_row(preset: dict, missing: dict, tiny: bool) -> tuple[str, str, str, str]:
    """mnist_gpu's acceptance row: each way it was judged, named, with its copies of training digits; the verdict on
    the best judging whose classes are even, named too. A run --deadline stopped early meets the target only if its
    weights so far did; below it, the recipe was not measured."""
    point, target = "mnist_gpu's 500 samples", f">= {TARGETS['judged']:.0%} judged p >= 0.9"
    judged = [j for j in preset.get("judged", {}).values() if "confident_fraction" in j]
    best = max((j for j in judged if even(j)), key=lambda j: j["confident_fraction"], default=None)
    if judged:
        parts = []
        for key, j in preset["judged"].items():
            if "confident_fraction" not in j:
                parts.append(f"{key}: {why_not(j)}")
                continue
            notes = [f"copies {j['copied_fraction']:.1%}"] if "copied_fraction" in j else []
            if not even(j):
                shares = j["class_shares"]
                notes.append(f"{max(shares):.0%} of it one digit ({shares.index(max(shares))}): not counted")
            parts.append(f"{j['confident_fraction']:.1%} ({j['how']}{''.join('; ' + n for n in notes)})")
        figure = "; ".join(parts) + f"; {training(preset)}"
        if best is not None and len(judged) > 1:
            figure += f"; best: {best['how']}"
        if real := next((j for j in judged if "real_confident_fraction" in j), None):  # the same for every judging
            figure += (f" (the real held-out digits: judged {real['real_confident_fraction']:.1%}" +
                       (f", copies {real['real_copied_fraction']:.1%}" if "real_copied_fraction" in real else "") + ")")
        if best is None:  # every judging uneven: a broken network, whatever its share
            return point, target, figure, "toy sizes" if tiny else "NOT met"
    elif errors := [j["judge_error"] for j in preset.get("judged", {}).values() if "judge_error" in j]:
        figure = why_not({"judge_error": errors[0]})
    elif "train_s" in preset:
        figure = f"{training(preset)}, not judged" + (" (--tiny)" if tiny else "")
    else:
        figure = why_not(preset or missing)
    said = verdict(best["confident_fraction"] if best is not None else None, TARGETS["judged"], False, tiny)
    if partial(preset) and said in ("met", "NOT met"):
        said = f"met by step {preset['steps_done']:,}" if said == "met" else "not measured (a partial run)"
    return point, target, figure, said


def partial(preset: dict) -> bool:
    return preset.get("steps_done", preset.get("steps", 0)) < preset.get("steps", 0)


def training(preset: dict) -> str:
    """The preset's training time, or where --deadline stopped it and what the whole run would take at its pace."""
    how = f"train.compile={preset.get('compile')}"
    if partial(preset):
        return (f"stopped by --deadline at step {preset['steps_done']:,} of {preset['steps']:,} after {preset['train_s']:.0f} s "
                f"(the whole run about {preset['whole_run_s']:.0f} s at that pace; {how})")
    return f"{preset['train_s']:.0f} s training ({how})"


def why_not(part: dict) -> str:
    """Why a part has no figure: skipped, failed (its last line), or did not run."""
    for key in ("skipped", "error", "judge_error"):
        if part.get(key):
            return f"{key}: {str(part[key]).strip().splitlines()[-1][:160]}"
    return "the part did not run"


def tables(f: dict) -> list[str]:
    lines = []
    cifar = f.get("cifar", {})
    if cifar:
        lines += ["", "| CIFAR-10 UNet | mode | images/s | TFLOP/s | of bf16 matmul |", "|---|---|---|---|---|"]
        lines += [f"| {k.split(' / ')[0]} | {k.split(' / ')[1]} | {v['images_per_s']:,.0f} | {v['tflops']:.1f} | {v['of_bf16_matmul']:.1%} |"
                  for k, v in cifar.items()]
    sampling = f.get("sampling", {})
    if sampling:
        first = next((v for v in sampling.values() if "n" in v), {"n": 500, "steps": 1000})
        lines += ["", f"| ancestral sampling, {first['n']} x {first['steps']:,} | s | ms a step | first call (3 steps) |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['s']:.2f} | {v['ms_per_step']:.2f} | {v['first_call_s']:.1f} s |" if "s" in v else f"| {k} | {why_not(v)} | | |"
                  for k, v in sampling.items()]
    trainers = [(k, f[k]) for k in ("demo", "demo cuda-graph", "demo reduce-overhead") if k in f]
    if trainers:
        lines += ["", "| demo trainer | train s | images/s (median log window) | the network's calls |", "|---|---|---|---|"]
        for k, v in trainers:
            seconds = v.get("train_s", v.get("train_s_with_compile"))
            calls = ", ".join(f"{name} {n}" for name, n in v.get("cuda_graph_calls", {}).items()) or "eager"
            lines.append(f"| {k} | {seconds:.1f} | {v.get('images_per_s_median_window', float('nan')):,.0f} | {calls} |" if seconds is not None
                         else f"| {k} | {why_not(v)} | | |")
    images = f.get("images", {})
    if "images_per_s_median_window" in images:
        lines += ["", f"The images preset (64x64 RGB, 19.4M parameters, {images['precision']}): {images['images_per_s_median_window']:,.0f} "
                      f"images/s over {images['steps']} steps of {images['batch_size']}, so its {images['preset_steps']:,} steps take "
                      f"{images['preset_minutes_at_that_rate']:.1f} min at that rate."]
    overhead = f.get("overhead", {})
    if overhead:
        lines += ["", "| engine overhead | engine ms/step | minimal loop ms/step |", "|---|---|---|"]
        lines += [f"| {k} ({v['precision']}) | {v['engine_ms']:.2f} | {v['plain_ms']:.2f} |" for k, v in overhead.items() if "engine_ms" in v]
        ops = overhead.get("ops_per_step")
        if ops:
            lines += ["", f"Ops that compute in one engine step of the demo: network forward {ops['forward']}, backward {ops['backward']}, "
                          f"the rest {ops['rest']} (eager even with train.compile = cuda-graph)."]
    profiles = f.get("profiles", {})
    if profiles:
        lines += ["", "| profile | kernel launches per call | device ms per call |", "|---|---|---|"]
        lines += [f"| {k} | {v.get('kernel_launches_per_call', float('nan')):.0f} | {v.get('device_ms_per_call', float('nan')):.2f} |"
                  for k, v in profiles.items() if "error" not in v]
    return lines


def tests_line(log: Path) -> str:
    """pytest's summary line of tests/test_cuda.py (e.g. "27 passed in 80.1s"), or why there is none."""
    if not log.exists():
        return f"{log}: missing"
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", log.read_text(), re.MULTILINE)
    return found[-1] if found else f"{log}: no pytest summary (cut off?)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", type=Path, help="bench/gpu.py --out files, in the order they were measured")
    p.add_argument("--tests", type=Path, default=None, help="tests/test_cuda.py's log (bench/gpu_session.sh writes test_cuda.log)")
    args = p.parse_args(argv)
    try:
        f = merged(args.json)
    except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
        print(f"gpu_report: {e}", file=sys.stderr)
        return 2
    print(f"Device: {f.get('device')}{' (--tiny: toy sizes, not the issue figures)' if f.get('tiny') else ''}; "
          f"measured bf16 matmul {f.get('bf16_matmul_tflops', float('nan')):.1f} TFLOP/s")
    if args.tests:
        print(f"tests/test_cuda.py: {tests_line(args.tests)}")
    print("\n| acceptance point | target | figure | verdict |\n|---|---|---|---|")
    for row in acceptance(f):
        print("| " + " | ".join(row) + " |")
    print("\n".join(tables(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
