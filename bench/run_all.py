"""Run every benchmark and write bench/RESULTS.md (what `make bench` runs).

    python bench/run_all.py [--quick] [--compile] [--only vit,clip,...] [--out bench/RESULTS.md]

Each bench runs in its own process, one after the other (never two at once: they would
share the cores).  The step benches (vit, clip, gpt, features) write a JSON record that is
tabulated here; memory and actckpt write their own section; the others (data, losses,
tokenizer, by other helpers) are quoted as printed.  The end of the file compares the
figures with the targets of the performance issue.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from mmssl.cliargs import summary

HERE = Path(__file__).resolve().parent
# step benches: name -> (script, fixed args); clip_web: the CLIP step on web-caption lengths
STEP_BENCHES = {
    "vit": ("bench_vit.py", []),
    "clip": ("bench_clip.py", []),
    "clip_web": ("bench_clip.py", ["--caption-tokens", "5,20"]),
    "gpt": ("bench_gpt.py", []),
    "features": ("bench_features.py", []),
    "switches": ("bench_switches.py", []),
}
# benches that write their own markdown section (--markdown): name -> extra args for --quick
MARKDOWN_BENCHES = {
    "memory": ["--precision", "fp32", "--steps", "1"],
    "actckpt": ["--quick"],
    "host_memory": ["--quick", "--steps", "2"],
}
OTHER_BENCHES = {  # name -> (script, extra args for --quick)
    "data": ("bench_data.py", ["--samples", "256", "--rounds", "1"]),
    "losses": ("bench_losses.py", ["--global-batch", "1024", "--iters", "1"]),
    "tokenizer": ("bench_tokenizer.py", ["--num-texts", "1024", "--repeats", "3"]),
    "attention": ("bench_attention.py", ["--reps", "3"]),
}


# the benches whose own parser takes --threads; each of them otherwise sets torch to every
# core itself (common.set_threads), whatever OMP_NUM_THREADS says
THREADED = {*STEP_BENCHES, "actckpt", "host_memory", "attention"}


def bench_command(
    name: str, quick: bool, compile: bool, threads: int | None, tmp: Path
) -> tuple[str, list[str], list[str]]:
    """(script, its arguments, the arguments shown in RESULTS.md: no temporary paths)."""
    extra: list[str] = []
    if name in STEP_BENCHES:
        script, fixed = STEP_BENCHES[name]
        extra = [*fixed, *(["--quick"] if quick else []), *(["--compile"] if compile else [])]
    elif name in MARKDOWN_BENCHES:
        script = f"bench_{name}.py"
        extra = [*MARKDOWN_BENCHES[name]] if quick else []
    else:
        script, quick_args = OTHER_BENCHES[name]
        extra = [*quick_args] if quick else []
    if threads and name in THREADED:
        extra += ["--threads", str(threads)]
    shown = list(extra)
    if name in STEP_BENCHES:
        extra += ["--json", str(tmp / f"{name}.json")]
    elif name in MARKDOWN_BENCHES:
        extra += ["--markdown", str(tmp / f"{name}.md")]
    return script, extra, shown


def _table(record: dict) -> list[str]:
    lines = [
        f"### {record['title']}",
        "",
        "Command: `" + record["command"].strip() + "`  ",
        "Config: " + ", ".join(f"{k}={v}" for k, v in record["config"].items()) + "  ",
        f"FLOPs per timed step (counted; fwd+bwd when it trains): {record['flops'] / 1e9:.2f} GFLOP; "
        f"rounds: {record['rounds']}; load average at the end: {record['machine']['loadavg']}  ",
    ]
    for p in record["peaks"].values():
        note = f" ({p['note']})" if p["note"] else ""
        lines.append(f"Matmul peak {p['dtype']}: {p['flops_per_s'] / 1e9:.2f} GFLOP/s{note}  ")
    lines += [
        "",
        "| path | side | median s | CPU s | GFLOP | % of same-dtype matmul peak | all times (s) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in record["paths"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | {r['side']} | skipped: {r['skipped']} | | | | |")
            continue
        gflop = f"{r['gflop']:.2f}" if "gflop" in r else ""
        lines.append(
            f"| {r['name']} | {r['side']} | {r['median_s']:.3f} | {r['cpu_median_s']:.3f} | "
            f"{gflop} | {r['peak_fraction'] * 100:.1f}% | "
            f"{', '.join(f'{t:.2f}' for t in r['times_s'])} |"
        )
    lines.append("")
    spreads = common.round_spreads(record["paths"])
    for key, value in common.ratios_from_rows(record["paths"]).items():
        lines.append(f"- {key}: **{value:.2f}x**{common.spread_text(spreads.get(key))}")
    return lines + [""]


def _with_command(section: str, shown: str) -> str:
    """A bench's own markdown section with its `Command:` line as a user would type it: the
    bench writes the arguments it was given, run_all's temporary --markdown path among them."""
    lines = section.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("Command: `"):
            rest = line.split("`", 2)[2]
            lines[i] = f"Command: `{shown}`{rest}"
            break
    return "\n".join(lines)


def _fast_bf16_isa(m: dict) -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & set(m["isa"]))


def _vs_default(rows: list[dict]) -> str:
    """mmssl's fastest path against the peer's plain bf16 autocast path (default attention)."""
    timed = [r for r in rows if "median_s" in r]
    ours = min((r["median_s"] for r in timed if r["side"] == "mmssl"), default=None)
    plain = [  # the variants name their other kernel after a comma
        r["median_s"]
        for r in timed
        if r["side"] == "peer" and "autocast" in r["name"] and "," not in r["name"]
    ]
    if ours is None or not plain:
        return "no plain bf16 autocast peer path"
    return f"{plain[0] / ours:.2f}x against its bf16 autocast with its default attention"


def _ratios(rows: list[dict]) -> dict[str, tuple[float, str]]:
    """The step ratios by their label ("best path (wall)"; the paths' names dropped): the
    value and its per-round spread as printed beside it (empty for CPU ratios)."""
    spreads = common.round_spreads(rows)
    return {
        key.split(":")[0]: (value, common.spread_text(spreads.get(key)))
        for key, value in common.ratios_from_rows(rows).items()
    }


def _times(ratio: float, target: float) -> str:
    """A ratio as '1.02x', with a third decimal where two would round a miss onto its target
    (0.996 is printed 0.996x, not 1.00x beside "no")."""
    two = f"{ratio:.2f}x"
    return f"{ratio:.3f}x" if ratio < target and float(two[:-1]) >= target else two


def _targets(records: dict[str, object], m: dict) -> list[str]:
    """The issue's targets next to the figures measured in this run."""
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    peers = (
        ("vit", "timm"),
        ("clip", "open_clip"),
        ("clip_web", "open_clip (web-caption lengths)"),
        ("gpt", "HF GPT-2"),
    )
    for name, peer in peers:
        rec = records.get(name)
        if not isinstance(rec, dict):
            continue
        ratios = _ratios(rec["paths"])
        wall, cpu = ratios.get("fp32 same config (wall)"), ratios.get("fp32 same config (cpu)")
        work = ratios.get("fp32 same work (wall)")
        if wall and cpu:
            met = "yes" if wall[0] >= 1.0 else "no"
            same_work = (
                f"; doing {peer.split(' (')[0]}'s work (no row or column skipped): "
                f"{work[0]:.2f}x wall{work[1]}"
                if work
                else ""
            )
            lines.append(
                f"| fp32 same config: mmssl >= 1.0x {peer} | {_times(wall[0], 1.0)} wall"
                f"{wall[1]}, {cpu[0]:.2f}x CPU{same_work} | {met} |"
            )
        best, ceiling = ratios.get("best path (wall)"), ratios.get(f"{common.GEMM_CEILING} (wall)")
        if best and _fast_bf16_isa(m):
            met = "yes" if best[0] >= 1.3 else "no"
            at_most = f"; mmssl's bf16 GEMMs + AdamW alone: {ceiling[0]:.2f}x" if ceiling else ""
            lines.append(
                f"| best path: mmssl >= 1.3x {peer}'s best (its faster attention kernel) | "
                f"{_times(best[0], 1.3)} wall{best[1]} "
                f"({_vs_default(rec['paths'])}{at_most}) | {met} |"
            )
        bf16 = [r for r in rec["paths"] if r["side"] == "mmssl" and "bf16" in r["name"]]
        if name == "vit" and _fast_bf16_isa(m) and all("peak_fraction" in r for r in bf16):
            top = max((r["peak_fraction"] for r in bf16), default=0.0)
            met = "yes" if top >= 0.5 else "no"
            floor = [
                r["peak_fraction"]
                for r in rec["paths"]
                if r["side"] == "floor" and "peak_fraction" in r
            ]
            at_floor = f" (its GEMMs + AdamW alone: {floor[0]:.1%})" if floor else ""
            lines.append(
                f"| ViT-S/16 best mmssl path >= 50% of bf16 matmul peak | {top:.1%}{at_floor} | {met} |"
            )
    if not _fast_bf16_isa(m):
        lines.append(
            "| best path >= 1.3x each peer's bf16 autocast; >= 50% of bf16 matmul peak "
            "(ViT-S/16) | not measurable: no bf16 matmul hardware | no (machine) |"
        )
    memory = records.get("memory")
    if isinstance(memory, str):
        rss: dict[str, list[str]] = {}  # "bf16 ZeRO-3 / ZeRO-0" -> measured RSS ratios
        for line in memory.splitlines():
            for kind in ("above imports", "absolute"):
                if f"ZeRO-3 / ZeRO-0, peak RSS {kind}" in line:
                    label = line.split(",")[0].lstrip("- ")
                    rss.setdefault(label, []).append(f"{line.split('**')[1]} {kind}")
        for line in memory.splitlines():
            if "ZeRO-3 / ZeRO-0, params+optimizer" in line:
                value = float(line.split("**")[1].rstrip("x"))
                met = "yes" if value <= 0.6 else "no"
                label = line.split(",")[0].lstrip("- ")
                measured = f"; peak RSS, measured: {', '.join(rss[label])}" if label in rss else ""
                lines.append(
                    f"| {label}: params+optimizer <= 0.6x ZeRO-0 | {value:.2f}x (the tensors "
                    f"a rank holds, counted{measured}) | {met} |"
                )
    data = records.get("data")
    lines += _data_targets(data) if isinstance(data, str) else []
    return lines + [""]


def _data_targets(text: str) -> list[str]:
    """Target rows from bench_data's printout, one per data set and hue mode (the torch
    reference renderer's rows, "hsv torch" and the like, left out): the Data issue's (>=
    0.8x the decode-only ceiling, >= 1.0x webdataset) and the Performance issue's (>= 0.9x
    the ceiling)."""
    rows, dataset = [], ""
    for line in text.splitlines():
        if line and not line.startswith(" ") and ": " in line and " px " in line:
            dataset = line.split(":")[0]
        found = re.search(r"desc \(([\w ]+)\).*?([\d.]+)x decode.*?([\d.]+)x webdataset", line)
        if not found or "torch" in found.group(1):  # the torch reference renderer's rows
            continue
        hue, decode, wds = found.group(1), float(found.group(2)), float(found.group(3))
        met = (
            f"0.8x {'yes' if decode >= 0.8 else 'no'}, 0.9x {'yes' if decode >= 0.9 else 'no'}, "
            f"1.0x {'yes' if wds >= 1.0 else 'no'}"
        )
        rows.append(
            f"| data, {dataset}, {hue}: >= 0.8x (Data) and >= 0.9x (Performance) the "
            f"decode-only ceiling, >= 1.0x webdataset | {decode:.2f}x decode, {wds:.2f}x "
            f"webdataset | {met} |"
        )
    return rows or ["| data pipeline targets | no data figures in this run | |"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile", action="store_true", help="add the compiled mmssl paths")
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated subset of "
        + ", ".join([*STEP_BENCHES, *MARKDOWN_BENCHES, *OTHER_BENCHES]),
    )
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads, >= 1 (default: all cores)"
    )
    args = p.parse_args(argv)
    problem = common.args_problem(args, {})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    names = [*STEP_BENCHES, *MARKDOWN_BENCHES, *OTHER_BENCHES]
    chosen = names if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(f"error: unknown bench {unknown}; choose from {names}", file=sys.stderr)
        return 2
    threads = common.set_threads(args.threads)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": str(threads)}
    out = [
        "# mmssl benchmark results",
        "",
        "Written by `python bench/run_all.py"
        + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))
        + "`"
        + f" on {time.strftime('%Y-%m-%d %H:%M')}. Method: bench/common.py.",
        "",
    ]
    m = common.machine()
    out += [
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores, ISA: {', '.join(m['isa'])}",
        *(
            []
            if _fast_bf16_isa(m)
            else [
                "- **No bf16 matmul hardware** (neither AMX nor AVX512-BF16): bf16 matmuls run "
                "through a fallback some 100x slower than fp32 here (the bf16 matmul peak of "
                "each bench below), so the bf16 paths are skipped (`--bf16 on` forces them) and "
                "the bf16 targets cannot be met or measured on this machine."
            ]
        ),
        f"- torch threads: {threads}; versions: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- load average at start: {m['loadavg']} (other jobs share the machine: absolute "
        "times are noisy, ratios come from alternating paths within one process)",
        "",
        "## Results",
        "",
    ]
    failures = 0
    records: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            script, extra, shown_args = bench_command(
                name, args.quick, args.compile, args.threads, Path(tmp)
            )
            if not (HERE / script).is_file():
                out += [f"### {name}", "", f"{script} is not present.", ""]
                continue
            cmd = [sys.executable, str(HERE / script), *extra]
            shown = " ".join(["python", f"bench/{script}", *shown_args])
            print(f"\n$ {shown}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            print(proc.stdout[-4000:], flush=True)
            if proc.returncode != 0:
                failures += 1
                out += [
                    f"### {name}: FAILED (exit {proc.returncode})",
                    "",
                    "```",
                    proc.stderr[-3000:],
                    "```",
                    "",
                ]
                continue
            if name in STEP_BENCHES:
                record = json.loads((Path(tmp) / f"{name}.json").read_text())
                record["command"] = shown
                records[name] = record
                out += _table(record)
                out.append(f"Wall time of the bench: {seconds:.0f} s.")
                out.append("")
            elif name in MARKDOWN_BENCHES:
                section = _with_command((Path(tmp) / f"{name}.md").read_text(), shown)
                records[name] = section
                out += [section, f"Wall time of the bench: {seconds:.0f} s.", ""]
            else:
                records[name] = proc.stdout
                out += [
                    f"### {name}",
                    "",
                    f"Command: `{shown}` ({seconds:.0f} s)",
                    "",
                    "```",
                    proc.stdout.strip(),
                    "```",
                    "",
                ]
    out += _targets(records, m)
    out += ["", f"Load average at the end: {[round(x, 2) for x in os.getloadavg()]}", ""]
    Path(args.out).write_text("\n".join(out))
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
