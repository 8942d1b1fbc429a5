"""``mmtrain bench all``: every benchmark in its own subprocess, then one table of the issue-9 targets.

Each benchmark (align, attention, contrastive, data, tiled_loss, vision_encoder; scaling with ``--with-scaling``,
it needs 2+ GPUs) runs as ``python -m mmtrain.cli.main bench NAME --out DIR/NAME.json [--smoke] [ARGS]`` under a
wall-clock limit, so a hang or a crash is recorded (status "timeout" / "failed", the last lines of its stderr) and
the rest still run. A benchmark that timed out keeps the rows it printed as JSON lines before the limit.

Then the JSON files are read and one summary is printed and written (``DIR/summary.json``, ``DIR/summary.md``, a
Markdown table ready for the README with the command line, device, torch version and measured bf16 peak):

| row | figures | target |
| --- | --- | --- |
| clip_vit_b16 step | best mmtrain vs open_clip samples/s, peak GiB each | >= 1.5x |
| align_base step | best mmtrain vs transformers samples/s, peak GiB each | >= 2x and memory not more |
| vision encoder | best mmtrain vs torchtune tiles/s, MFU, peak GiB | >= 1.3x |
| data pipeline | best path images/s | >= 3000 |
| recipe end to end | e2e samples/s / best step-only samples/s | >= 90% |
| tiled loss | worst tiled peak beyond the embeddings at 65,536 x 640 | <= 4 GiB |
| attention local | local window vs dense SDPA useful TFLOP/s at the longest length | >= 50% |
| attention approximations | linformer/nystrom/favor peak memory / materialized-mask attention | <= 1/8 |

Every row says met / not met / not measured (with the reason: peer not importable, bench timed out, smoke shapes
differ from the target's, ...). A missing figure is never a failure: the exit status is 0 unless a benchmark
crashed (a Python traceback, or killed by a signal other than the time limit).

    mmtrain bench all [--out-dir bench_results] [--only a,b | --skip a,b] [--timeout-per-bench 540]
                      [--with-scaling] [--args-for NAME="--batch 128"] [--reuse] [--summary-only] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mmtrain.errors import UserError

__all__ = ["BENCHMARKS", "build_summary", "classify", "format_markdown", "main", "run_benchmark"]

BENCHMARKS = ("align", "attention", "contrastive", "data", "tiled_loss", "vision_encoder")
OPTIONAL_BENCHMARKS = ("scaling",)  # needs 2+ GPUs: only with --with-scaling or named in --only
STDERR_TAIL_LINES = 20

# Issue-9 targets (and issue 3 / 5 for attention and the tiled loss).
CLIP_TARGET_RATIO = 1.5
ALIGN_TARGET_RATIO = 2.0
VISION_TARGET_RATIO = 1.3
DATA_TARGET_IMAGES_PER_S = 3000.0
E2E_TARGET_FRACTION = 0.9
TILED_TARGET_GIB = 4.0
TILED_TARGET_SHAPE = (65536, 640)
LOCAL_TARGET_FRACTION = 0.5
LOCAL_TARGET_SEQ_LEN = 16384
APPROX_TARGET_MEMORY_FRACTION = 1 / 8
APPROX_TARGET_FROM_SEQ_LEN = 8192
APPROX_MECHANISMS = ("linformer", "nystrom", "favor")

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"


# ----------------------------------------------------------------------------------------------- running


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmtrain bench all", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="bench_results", help="folder for NAME.json, NAME.log and the summary")
    p.add_argument("--only", default=None, help="comma list of benchmarks to run (default: all)")
    p.add_argument("--skip", default=None, help="comma list of benchmarks not to run")
    p.add_argument("--with-scaling", action="store_true", help="also run the multi-GPU scaling benchmark")
    p.add_argument("--timeout-per-bench", type=float, default=540.0, help="wall-clock seconds per benchmark")
    p.add_argument("--smoke", action="store_true", help="pass --smoke to every benchmark (tiny CPU runs)")
    p.add_argument("--args-for", action="append", default=[], metavar='NAME="ARGS"',
                   help="extra arguments for one benchmark, e.g. --args-for contrastive='--data /imgs'")
    p.add_argument("--reuse", action="store_true",
                   help="benchmarks not run now take their figures from DIR/NAME.json of an earlier run")
    p.add_argument("--summary-only", action="store_true", help="run nothing; summarize DIR/*.json (implies --reuse)")
    p.add_argument("--quiet", action="store_true", help="do not echo the benchmarks' output")
    args = p.parse_args(argv)
    if args.timeout_per_bench <= 0:
        raise UserError(f"bench all: --timeout-per-bench must be > 0, got {args.timeout_per_bench:g}")
    return args


def _names(text: str | None, option: str) -> list[str]:
    from mmtrain.config._paths import suggest

    known = BENCHMARKS + OPTIONAL_BENCHMARKS
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    for name in names:
        if name not in known:
            raise UserError(f"bench all: {option} names unknown benchmark '{name}'{suggest(name, list(known))}; "
                            f"available: {', '.join(known)}")
    return names


def _selected(args: argparse.Namespace) -> list[str]:
    if args.summary_only:
        return []
    only, skip = _names(args.only, "--only"), _names(args.skip, "--skip")
    candidates = list(BENCHMARKS) + (list(OPTIONAL_BENCHMARKS) if args.with_scaling else [])
    if only:  # naming scaling in --only runs it without --with-scaling
        candidates = [n for n in BENCHMARKS + OPTIONAL_BENCHMARKS if n in only]
    return [n for n in candidates if n not in skip]


def _extra_args(args: argparse.Namespace) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for item in args.args_for:
        name, sep, rest = item.partition("=")
        if not sep:
            raise UserError(f"bench all: --args-for wants NAME=\"ARGS\", got '{item}'")
        _names(name, "--args-for")
        extra.setdefault(name.strip(), []).extend(shlex.split(rest))
    return extra


def _pump(stream, sink: list[str], log, echo, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line.rstrip("\n"))
        log.write(line)
        log.flush()
        if echo is not None:
            echo.write(f"{prefix}{line}")
            echo.flush()
    stream.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """End the benchmark's process group (its DataLoader workers and torchrun ranks with it): TERM, then KILL."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _json_lines(lines: list[str]) -> list[dict[str, Any]]:
    rows = []
    for line in lines:
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                rows.append(value)
    return rows


def classify(timed_out: bool, returncode: int | None, stderr: list[str]) -> tuple[str, bool]:
    """(status, crashed) of a finished benchmark process. Crashed: a Python traceback was printed, or a signal
    ended it (segfault, out-of-memory kill) other than our own time limit. A non-zero exit without either (a
    UserError's one line, argparse's usage error, a benchmark reporting a failed check) is "failed" only."""
    if timed_out:
        return "timeout", False
    if returncode == 0:
        return "ok", False
    traceback_printed = any(line.startswith("Traceback (most recent call last)") for line in stderr)
    return "failed", traceback_printed or (returncode is not None and returncode < 0)


def run_benchmark(name: str, out_dir: Path, extra: list[str], timeout_s: float, echo: bool = True
                  ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run one benchmark in a subprocess; returns (run record, its JSON report or None).

    Record: name, command, status ("ok" | "failed" | "timeout"), returncode, seconds, python_error (a traceback
    was printed, or a signal other than our time limit ended it), stderr_tail (last lines), partial (report
    rebuilt from the JSON lines printed before a time limit or a crash).
    """
    out = out_dir / f"{name}.json"
    if out.exists():
        out.unlink()  # never read a stale file from an earlier run as this run's figures
    command = [sys.executable, "-m", "mmtrain.cli.main", "bench", name, "--out", str(out), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    stdout: list[str] = []
    stderr: list[str] = []
    start = time.monotonic()
    with open(out_dir / f"{name}.log", "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                env=env, start_new_session=True)
        pumps = [threading.Thread(target=_pump, daemon=True,
                                  args=(proc.stdout, stdout, log, sys.stdout if echo else None, f"[{name}] ")),
                 threading.Thread(target=_pump, daemon=True,
                                  args=(proc.stderr, stderr, log, sys.stderr if echo else None, f"[{name}] "))]
        for pump in pumps:
            pump.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:  # Ctrl-C: do not leave the benchmark running on the GPU
            _kill_group(proc)
            raise
        for pump in pumps:
            pump.join(timeout=10.0)  # a grandchild outside the group may hold the pipe; do not wait on it forever
    seconds = time.monotonic() - start
    code = proc.returncode
    status, python_error = classify(timed_out, code, stderr)
    record: dict[str, Any] = {
        "name": name, "command": shlex.join(command), "status": status, "returncode": code,
        "seconds": round(seconds, 2), "python_error": python_error,
        "stderr_tail": [line for line in stderr if line.strip()][-STDERR_TAIL_LINES:],
    }
    if timed_out:
        record["timeout_s"] = timeout_s
    report = _read_report(out)
    if report is None:
        rows = _json_lines(stdout)
        if rows:
            report = {"results": rows, "partial": True}
            record["partial"] = True
    return record, report


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------------------------- summary


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def _gib(value: Any) -> str:
    v = _number(value)
    return f"{v:.1f} GiB" if v is not None else "peak n/a"


def _row(key: str, bench: str, what: str, target: str) -> dict[str, Any]:
    return {"key": key, "benchmark": bench, "what": what, "target": target, "mmtrain": None, "peer": None,
            "result": None, "status": NOT_MEASURED, "reason": None, "values": {}}


def _why_missing(bench: str, runs: dict[str, dict[str, Any]]) -> str:
    run = runs.get(bench)
    if run is None:
        return f"{bench} not run"
    if run["status"] == "timeout":
        return f"{bench} timed out after {run.get('timeout_s', 0):g} s"
    if run["status"] == "failed":
        last = run["stderr_tail"][-1] if run.get("stderr_tail") else ""
        return f"{bench} failed (exit {run.get('returncode')}){': ' + last if last else ''}"
    return f"{bench} wrote no JSON report"


def _partial_note(bench: str, report: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str | None:
    if not report.get("partial"):
        return None
    return f"partial: {_why_missing(bench, runs)}; rows printed before it"


def _shape_mismatch(report: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Where the report names its shape and it differs from the target's: 'ran at ...; target at ...'."""
    if report.get("smoke"):
        return "--smoke run (tiny CPU shapes), not the target's"
    differ = [(k, report[k], v) for k, v in expected.items() if k in report and report[k] != v]
    if not differ:
        return None
    ran = ", ".join(f"{k} {got}" for k, got, _ in differ)
    want = ", ".join(f"{k} {v}" for k, _, v in differ)
    return f"ran at {ran}; the target is at {want}"


def _results(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = report.get("results")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _judge(row: dict[str, Any], met: bool, mismatch: str | None, notes: list[str]) -> dict[str, Any]:
    """Settle a measured row: not measured when its shapes are not the target's (the mismatch is the reason),
    else met or not met, with the notes as its reason."""
    if mismatch:
        row["reason"] = "; ".join([mismatch] + notes)
        return row
    row["status"] = MET if met else NOT_MET
    row["reason"] = "; ".join(notes) or None
    return row


def _best(rows: list[dict[str, Any]], metric: str, prefix: str = "mmtrain") -> dict[str, Any] | None:
    measured = [r for r in rows if str(r.get("name", "")).startswith(prefix) and _number(r.get(metric)) is not None]
    return max(measured, key=lambda r: r[metric], default=None)


def _named(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("name") == name), None)


def _ratio_row(row: dict[str, Any], bench: str, report: dict[str, Any] | None, runs: dict[str, dict[str, Any]],
               peer: str, peer_note_key: str, metric: str, unit: str, target: float,
               expected_shape: dict[str, Any], memory_not_more: bool = False) -> dict[str, Any]:
    """A best-mmtrain-over-peer throughput row (clip, align)."""
    if report is None:
        row["reason"] = _why_missing(bench, runs)
        return row
    rows = _results(report)
    best, other = _best(rows, metric), _named(rows, peer)
    notes = [n for n in (_partial_note(bench, report, runs),) if n]
    if best is not None:
        row["mmtrain"] = f"{best[metric]:.1f} {unit}, {_gib(best.get('peak_memory_gib'))} ({best['name']})"
        row["values"].update(mmtrain=best[metric], mmtrain_variant=best["name"],
                             mmtrain_peak_gib=_number(best.get("peak_memory_gib")))
    if other is not None and _number(other.get(metric)) is not None:
        row["peer"] = f"{peer} {other[metric]:.1f} {unit}, {_gib(other.get('peak_memory_gib'))}"
        row["values"].update(peer=other[metric], peer_peak_gib=_number(other.get("peak_memory_gib")))
    if best is None:
        errors = [f"{r['name']}: {r['error']}" for r in rows if str(r.get("name", "")).startswith("mmtrain")
                  and "error" in r]
        row["reason"] = "; ".join(errors + notes) or f"no mmtrain {unit} figure in {bench}.json"
        return row
    if "peer" not in row["values"]:
        if other is not None and "error" in other:
            reason = f"{peer}: {other['error']}"
        elif report.get(peer_note_key):
            reason = str(report[peer_note_key])
        elif report.get("smoke"):
            reason = f"{peer} is not run in --smoke"
        else:
            reason = f"no {peer} figure in {bench}.json"
        row["reason"] = "; ".join([reason] + notes)
        return row
    ratio = row["values"]["mmtrain"] / row["values"]["peer"]
    row["values"]["ratio"] = ratio
    row["result"] = f"{ratio:.2f}x"
    mismatch = _shape_mismatch(report, expected_shape)
    if mismatch:
        row["reason"] = "; ".join([mismatch] + notes)
        return row
    status = MET if ratio >= target else NOT_MET
    if memory_not_more:
        mine, theirs = row["values"].get("mmtrain_peak_gib"), row["values"].get("peer_peak_gib")
        if mine is None or theirs is None:
            if status == MET:
                row["reason"] = "; ".join(["peak memory not reported, so 'memory not more' is unchecked"] + notes)
                return row
        else:
            row["values"]["memory_ratio"] = mine / theirs
            row["result"] += f", memory {mine / theirs:.2f}x"
            if mine > theirs:
                status = NOT_MET
    row["status"] = status
    row["reason"] = "; ".join(notes) or None
    return row


def _clip_row(report, runs) -> dict[str, Any]:
    row = _row("clip_vit_b16_step", "contrastive", "clip_vit_b16 train step (batch 256, 224 px)",
               f">= {CLIP_TARGET_RATIO:g}x open_clip samples/s")
    return _ratio_row(row, "contrastive", report, runs, "open_clip", "open_clip", "samples_per_s", "samples/s",
                      CLIP_TARGET_RATIO, {"batch": 256, "image_size": 224})


def _align_row(report, runs) -> dict[str, Any]:
    row = _row("align_base_step", "align", "align_base train step (batch 64, 289 px)",
               f">= {ALIGN_TARGET_RATIO:g}x transformers samples/s, memory not more")
    return _ratio_row(row, "align", report, runs, "transformers", "transformers", "samples_per_s", "samples/s",
                      ALIGN_TARGET_RATIO, {"batch": 64, "image_size": 289}, memory_not_more=True)


def _vision_row(report, runs) -> dict[str, Any]:
    row = _row("vision_encoder_step", "vision_encoder", "11B-shaped vision encoder step (4 images x 4 tiles)",
               f">= {VISION_TARGET_RATIO:g}x torchtune tiles/s")
    if report is None:
        row["reason"] = _why_missing("vision_encoder", runs)
        return row
    rows = _results(report)
    best, other = _best(rows, "tiles_per_s"), _named(rows, "torchtune eager")
    notes = [n for n in (_partial_note("vision_encoder", report, runs),) if n]

    def figure(r: dict[str, Any]) -> str:
        mfu = _number(r.get("mfu"))
        return f"{r['tiles_per_s']:.2f} tiles/s, MFU {f'{mfu:.0%}' if mfu is not None else 'n/a'}, " \
               f"{_gib(r.get('peak_memory_gib'))}"

    if best is None:
        row["reason"] = "; ".join(notes) or "no mmtrain tiles/s figure in vision_encoder.json"
        return row
    row["mmtrain"] = f"{figure(best)} ({best['name']})"
    row["values"].update(mmtrain=best["tiles_per_s"], mmtrain_variant=best["name"], mmtrain_mfu=_number(best.get("mfu")),
                         mmtrain_peak_gib=_number(best.get("peak_memory_gib")))
    if other is None or _number(other.get("tiles_per_s")) is None:
        if report.get("smoke"):
            reason = "torchtune is not run in --smoke"
        else:
            reason = "torchtune not importable (or --no-torchtune)"
        row["reason"] = "; ".join([reason] + notes)
        return row
    row["peer"] = f"torchtune {report.get('torchtune') or ''} {figure(other)}".replace("  ", " ")
    ratio = best["tiles_per_s"] / other["tiles_per_s"]
    row["values"].update(peer=other["tiles_per_s"], peer_mfu=_number(other.get("mfu")),
                         peer_peak_gib=_number(other.get("peak_memory_gib")), ratio=ratio)
    row["result"] = f"{ratio:.2f}x"
    shape = report.get("batch") if isinstance(report.get("batch"), dict) else {}
    config = report.get("config") if isinstance(report.get("config"), dict) else {}
    mismatch = _shape_mismatch({**shape, **config, "smoke": report.get("smoke")},
                               {"images": 4, "tiles": 4, "clip_embed_dim": 1280, "clip_num_layers": 32})
    return _judge(row, ratio >= VISION_TARGET_RATIO, mismatch, notes)


def _data_row(report, runs) -> dict[str, Any]:
    row = _row("data_pipeline", "data", "data pipeline: JPEG folder -> augmented 224 px batches",
               f">= {DATA_TARGET_IMAGES_PER_S:g} images/s")
    if report is None:
        row["reason"] = _why_missing("data", runs)
        return row
    rows = [r for r in _results(report) if _number(r.get("images_per_s")) is not None]
    notes = [n for n in (_partial_note("data", report, runs),) if n]
    if not rows:
        row["reason"] = "; ".join(notes) or "no images/s figure in data.json"
        return row
    best = max(rows, key=lambda r: r["images_per_s"])
    row["mmtrain"] = f"{best['images_per_s']:.0f} images/s ({best.get('path')}, {best.get('num_workers')} workers)"
    row["values"].update(images_per_s=best["images_per_s"], path=best.get("path"))
    row["result"] = f"{best['images_per_s']:.0f} images/s"
    return _judge(row, best["images_per_s"] >= DATA_TARGET_IMAGES_PER_S, _shape_mismatch(report, {"image_size": 224}),
                  notes)


def _e2e_row(report, runs) -> dict[str, Any]:
    row = _row("recipe_end_to_end", "contrastive", "recipe end to end: mmtrain run contrastive, JPEG folder",
               f">= {E2E_TARGET_FRACTION:.0%} of step-only samples/s")
    if report is None:
        row["reason"] = _why_missing("contrastive", runs)
        return row
    rows = _results(report)
    notes = [n for n in (_partial_note("contrastive", report, runs),) if n]
    e2e, step = _named(rows, "recipe_end_to_end"), _best(rows, "samples_per_s")
    if step is not None:
        row["peer"] = f"step only {step['samples_per_s']:.1f} samples/s ({step['name']})"
        row["values"].update(step_only=step["samples_per_s"], step_variant=step["name"])
    if e2e is None or _number(e2e.get("samples_per_s")) is None:
        if e2e is not None and "error" in e2e:
            reason = f"end-to-end run failed: {e2e['error']}"
        elif e2e is not None:
            reason = "end-to-end run logged no steady-state samples/s"
        else:
            reason = "no end-to-end row in contrastive.json (--no-e2e?)"
        row["reason"] = "; ".join([reason] + notes)
        return row
    row["mmtrain"] = f"{e2e['samples_per_s']:.1f} samples/s end to end ({e2e.get('data', 'data n/a')})"
    row["values"]["end_to_end"] = e2e["samples_per_s"]
    if step is None:
        row["reason"] = "; ".join(["no step-only figure to compare with"] + notes)
        return row
    fraction = e2e["samples_per_s"] / step["samples_per_s"]
    row["values"]["fraction"] = fraction
    row["result"] = f"{fraction:.0%}"
    return _judge(row, fraction >= E2E_TARGET_FRACTION, _shape_mismatch(report, {"batch": 256, "image_size": 224}),
                  notes)


def _tiled_row(report, runs) -> dict[str, Any]:
    batch, dim = TILED_TARGET_SHAPE
    row = _row("tiled_loss", "tiled_loss", f"tiled contrastive loss + backward at {batch:,} x {dim}",
               f"<= {TILED_TARGET_GIB:g} GiB beyond the embeddings")
    if report is None:
        row["reason"] = _why_missing("tiled_loss", runs)
        return row
    notes = [n for n in (_partial_note("tiled_loss", report, runs),) if n]
    tiled = [r for r in _results(report) if r.get("form") == "tiled"]
    measured = [r for r in tiled if _number(r.get("peak_beyond_embeddings_gib")) is not None]
    oom = [r["name"] for r in tiled if r.get("error")]
    if not measured and not oom:
        row["reason"] = "; ".join(notes) or "no tiled-loss memory figure in tiled_loss.json"
        return row
    if measured:
        worst = max(measured, key=lambda r: r["peak_beyond_embeddings_gib"])
        row["mmtrain"] = f"worst {worst['peak_beyond_embeddings_gib']:.3g} GiB ({worst['name']}, {len(measured)} variants)"
        row["values"].update(worst_peak_gib=worst["peak_beyond_embeddings_gib"], worst_variant=worst["name"])
        row["result"] = f"{worst['peak_beyond_embeddings_gib']:.3g} GiB"
    if oom:
        row["values"]["errors"] = oom
        row["result"] = (row["result"] + "; " if row["result"] else "") + f"{', '.join(oom)} did not fit"
    over = bool(oom) or row["values"].get("worst_peak_gib", 0.0) > TILED_TARGET_GIB
    return _judge(row, not over, _shape_mismatch(report, {"batch": batch, "dim": dim}), notes)


def _attention_rows(report, runs) -> list[dict[str, Any]]:
    local = _row("attention_local", "attention", "local attention (window 513) vs dense SDPA, fwd+bwd",
                 f">= {LOCAL_TARGET_FRACTION:.0%} of dense useful TFLOP/s at the longest length")
    approx = _row("attention_approx_memory", "attention",
                  f"{', '.join(APPROX_MECHANISMS)} peak memory vs attention with a materialized S x S mask",
                  f"<= 1/{round(1 / APPROX_TARGET_MEMORY_FRACTION)} of it at the longest length")
    speed = _row("attention_approx_speed", "attention",
                 f"{', '.join(APPROX_MECHANISMS)} fwd+bwd time vs dense SDPA",
                 f"faster than dense SDPA at every length >= {APPROX_TARGET_FROM_SEQ_LEN}")
    if report is None:
        local["reason"] = approx["reason"] = speed["reason"] = _why_missing("attention", runs)
        return [local, approx, speed]
    notes = [n for n in (_partial_note("attention", report, runs),) if n]
    rows = [r for r in _results(report) if r.get("status") == "ok" and "mechanism" in r]
    speed = _approx_speed_row(speed, rows, bool(report.get("smoke")), notes)

    def find(name: str, seq_len: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["mechanism"] == name and r.get("seq_len") == seq_len), None)

    dense_lengths = [r["seq_len"] for r in rows if r["mechanism"] == "sdpa"]
    if not dense_lengths:
        local["reason"] = approx["reason"] = "; ".join(notes) or "no dense SDPA row in attention.json"
        return [local, approx, speed]
    longest = max(dense_lengths)
    smoke = "--smoke run (tiny CPU shapes), not the target's" if report.get("smoke") else None
    short = (f"longest length measured is {longest}; the issue's target is at {LOCAL_TARGET_SEQ_LEN}"
             if longest < LOCAL_TARGET_SEQ_LEN else None)

    dense, window = find("sdpa", longest), find("local", longest)
    if window is None or not _number(window.get("tflops")) or not _number(dense.get("tflops")):
        local["reason"] = "; ".join([f"no local/dense TFLOP/s at {longest}"] + notes)
    else:
        fraction = window["tflops"] / dense["tflops"]
        local["mmtrain"] = f"local {window['tflops']:.3g} TFLOP/s at {longest}"
        local["peer"] = f"dense SDPA {dense['tflops']:.3g} TFLOP/s"
        local["result"] = f"{fraction:.0%}"
        local["values"].update(seq_len=longest, local_tflops=window["tflops"], dense_tflops=dense["tflops"],
                               fraction=fraction)
        if smoke:
            local["reason"] = "; ".join([smoke] + notes)
        else:
            local["status"] = MET if fraction >= LOCAL_TARGET_FRACTION else NOT_MET
            local["reason"] = "; ".join([n for n in (short,) if n] + notes) or None

    baseline = None
    for name in ("naive", "sdpa_masked"):  # naive: softmax with the S x S scores materialized
        candidate = find(name, longest)
        if candidate is not None and _number(candidate.get("peak_mem_mb")):
            baseline = candidate
            break
    fractions: dict[str, float] = {}
    for name in APPROX_MECHANISMS:
        r = find(name, longest)
        if baseline is not None and r is not None and _number(r.get("peak_mem_mb")) is not None:
            fractions[name] = r["peak_mem_mb"] / baseline["peak_mem_mb"]
    missing = [n for n in APPROX_MECHANISMS if n not in fractions]
    if baseline is None:
        approx["reason"] = "; ".join([smoke or f"no materialized-mask memory figure at {longest} (CPU runs have none)"]
                                     + notes)
        return [local, approx, speed]
    approx["peer"] = f"{baseline['mechanism']} {baseline['peak_mem_mb']:.0f} MiB at {longest}"
    if fractions:
        approx["mmtrain"] = ", ".join(f"{n} {find(n, longest)['peak_mem_mb']:.0f} MiB" for n in fractions)
        approx["result"] = ", ".join(f"{n} {f:.3f}" for n, f in fractions.items())
        approx["values"].update(seq_len=longest, baseline=baseline["mechanism"], fractions=fractions)
    if smoke:
        approx["reason"] = "; ".join([smoke] + notes)
    elif any(f > APPROX_TARGET_MEMORY_FRACTION for f in fractions.values()):
        approx["status"] = NOT_MET
        approx["reason"] = "; ".join([n for n in (short,) if n] + notes) or None
    elif missing:
        approx["reason"] = "; ".join([f"no memory figure for {', '.join(missing)} at {longest}"] + notes)
    else:
        approx["status"] = MET
        approx["reason"] = "; ".join([n for n in (short,) if n] + notes) or None
    return [local, approx, speed]


def _approx_speed_row(row: dict[str, Any], rows: list[dict[str, Any]], smoke: bool,
                      notes: list[str]) -> dict[str, Any]:
    """Each approximation's fwd+bwd time over dense SDPA's at every measured length from 8k up (< 1 is faster)."""
    times = {(r["mechanism"], r.get("seq_len")): r["time_ms"] for r in rows if _number(r.get("time_ms")) is not None}
    lengths = sorted(n for (m, n) in times if m == "sdpa" and n >= APPROX_TARGET_FROM_SEQ_LEN)
    if not lengths:
        row["reason"] = "; ".join([f"no dense SDPA time at {APPROX_TARGET_FROM_SEQ_LEN} or longer"] + notes)
        return row
    ratios = {name: {n: times[(name, n)] / times[("sdpa", n)] for n in lengths if (name, n) in times}
              for name in APPROX_MECHANISMS}
    slower = [f"{name} at {n}" for name, by_len in ratios.items() for n, ratio in by_len.items() if ratio >= 1.0]
    missing = [f"{name} at {n}" for name in APPROX_MECHANISMS for n in lengths if n not in ratios[name]]
    row["result"] = ", ".join(f"{name} " + "/".join(f"{r:.2f}" for r in by_len.values())
                              for name, by_len in ratios.items() if by_len)
    compared = [r for r in rows if r["mechanism"] in ("sdpa", *APPROX_MECHANISMS) and r.get("seq_len") in lengths]
    device_time = bool(compared) and all(r.get("timing") == "cuda graph" for r in compared)
    row["mmtrain"] = (("device time (CUDA-graph replay)" if device_time else "time") + " / dense SDPA's at "
                      + ", ".join(str(n) for n in lengths))
    row["values"].update(seq_lens=lengths, time_ratios=ratios)
    launched = {(r["mechanism"], r["seq_len"]): r["launch_ms"] for r in compared if _number(r.get("launch_ms"))}
    if device_time and launched:
        # The target is judged on device time; say where Python's per-call launch overhead makes one slower anyway.
        host_bound = [f"{name} at {n}" for name in APPROX_MECHANISMS for n in lengths
                      if (name, n) in launched and ("sdpa", n) in launched
                      and launched[(name, n)] >= launched[("sdpa", n)]]
        if host_bound:
            notes = notes + [f"launched from Python at this batch, slower than dense: {', '.join(host_bound)}"]
    if smoke:
        row["reason"] = "; ".join(["--smoke run (tiny CPU shapes), not the target's"] + notes)
    elif slower:
        row["status"] = NOT_MET
        row["reason"] = "; ".join([f"not faster: {', '.join(slower)}"] + notes)
    elif missing:
        row["reason"] = "; ".join([f"no time for {', '.join(missing)}"] + notes)
    else:
        row["status"] = MET
        row["reason"] = "; ".join(notes) or None
    return row


def _scaling_rows(report, runs) -> list[dict[str, Any]]:
    if report is None and "scaling" not in runs:
        return []
    row = _row("scaling", "scaling", "data-parallel weak scaling, 2 GPUs vs 1", ">= 1.9x samples/s on 2 GPUs")
    if report is None:
        row["reason"] = _why_missing("scaling", runs)
        return [row]
    two: dict[str, dict[str, Any]] = {}  # the best variant (DDP, FSDP, bf16 reduction) per model
    for r in _results(report):
        if r.get("world_size") == 2 and _number(r.get("speedup")):
            if r["model"] not in two or r["speedup"] > two[r["model"]]["speedup"]:
                two[r["model"]] = r
    if not two:
        row["reason"] = "no 2-GPU speed-up in scaling.json"
        return [row]
    row["mmtrain"] = ", ".join(f"{m} {r['samples_per_s']:.0f} samples/s ({r.get('strategy', 'ddp')})"
                               for m, r in two.items())
    row["result"] = ", ".join(f"{m} {r['speedup']:.2f}x" for m, r in two.items())
    row["values"]["speedup"] = {m: r["speedup"] for m, r in two.items()}
    if report.get("smoke"):
        row["reason"] = "--smoke run (tiny CPU shapes), not the target's"
    else:
        row["status"] = MET if all(r["speedup"] >= 1.9 for r in two.values()) else NOT_MET
    return [row]


def _environment(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def first(key: str) -> Any:
        ordered = sorted(reports.values(), key=lambda r: bool(r.get("smoke")))  # full runs first
        return next((r[key] for r in ordered if r.get(key)), None)

    peak = None
    vision = reports.get("vision_encoder") or {}
    if _number(vision.get("measured_bf16_peak_tflops")):
        peak = vision["measured_bf16_peak_tflops"]
    return {"device": first("device"), "torch": first("torch"), "measured_bf16_peak_tflops": peak}


def build_summary(reports: dict[str, dict[str, Any] | None], runs: dict[str, dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
    """The target table from the benchmarks' JSON reports (keyed by benchmark name; None or absent: no report)
    and their run records (keyed the same; absent: not run). Pure: reads only its arguments."""
    runs = runs or {}
    get = lambda name: reports.get(name) or None  # noqa: E731
    rows = [_clip_row(get("contrastive"), runs), _align_row(get("align"), runs),
            _vision_row(get("vision_encoder"), runs), _data_row(get("data"), runs),
            _e2e_row(get("contrastive"), runs), _tiled_row(get("tiled_loss"), runs),
            *_attention_rows(get("attention"), runs), *_scaling_rows(get("scaling"), runs)]
    counts = {status: sum(r["status"] == status for r in rows) for status in (MET, NOT_MET, NOT_MEASURED)}
    present = {name: report for name, report in reports.items() if report}
    return {"environment": _environment(present), "rows": rows, "counts": counts, "runs": runs}


def _cell(text: Any) -> str:
    return "-" if text in (None, "") else str(text).replace("|", "\\|").replace("\n", " ")


def format_markdown(summary: dict[str, Any], command: str | None = None) -> str:
    """The summary as a Markdown section: command, environment, one table row per target."""
    env = summary["environment"]
    lines = []
    if command:
        lines += [f"Command: `{command}`", ""]
    peak = env.get("measured_bf16_peak_tflops")
    lines += [f"Device: {env.get('device') or 'unknown'}; torch {env.get('torch') or 'unknown'}; measured bf16 "
              f"matmul peak: {f'{peak:.0f} TFLOP/s' if peak else 'not measured'}", ""]
    lines += ["| benchmark | mmtrain | peer / baseline | result | target | status |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in summary["rows"]:
        status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
        lines.append(f"| {_cell(row['what'])} | {_cell(row['mmtrain'])} | {_cell(row['peer'])} | "
                     f"{_cell(row['result'])} | {_cell(row['target'])} | {_cell(status)} |")
    runs = summary.get("runs") or {}
    if runs:
        lines += ["", "| benchmark run | status | seconds |", "| --- | --- | --- |"]
        for name, run in runs.items():
            lines.append(f"| {name} | {_cell(run['status'])} | {_cell(run.get('seconds'))} |")
    return "\n".join(lines) + "\n"


def _print_table(summary: dict[str, Any]) -> None:
    print(f"{'target':<26} {'result':<34} {'status':<13} detail")
    for row in summary["rows"]:
        detail = " | ".join(str(x) for x in (row["mmtrain"], row["peer"], row["reason"]) if x)
        print(f"{row['key']:<26} {_cell(row['result'])[:34]:<34} {row['status']:<13} {detail}")
    counts = summary["counts"]
    print(f"{counts[MET]} met, {counts[NOT_MET]} not met, {counts[NOT_MEASURED]} not measured")


def _write_summary(summary: dict[str, Any], out_dir: Path, command: str) -> None:
    summary = {**summary, "command": command}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    (out_dir / "summary.md").write_text(format_markdown(summary, command), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    selected = _selected(args)
    extra = _extra_args(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["mmtrain", "bench", "all", *argv])
    reuse = args.reuse or args.summary_only
    reports: dict[str, dict[str, Any] | None] = {}
    runs: dict[str, dict[str, Any]] = {}
    if reuse:
        for name in BENCHMARKS + OPTIONAL_BENCHMARKS:
            if name not in selected:
                report = _read_report(out_dir / f"{name}.json")
                if report is not None:
                    reports[name] = report
                    runs[name] = {"name": name, "status": "reused", "returncode": None, "seconds": None,
                                  "python_error": False, "stderr_tail": [],
                                  "json": str(out_dir / f"{name}.json")}
    for index, name in enumerate(selected, 1):
        print(f"== bench {index}/{len(selected)}: {name} (limit {args.timeout_per_bench:g} s)", flush=True)
        bench_args = (["--smoke"] if args.smoke else []) + extra.get(name, [])
        record, report = run_benchmark(name, out_dir, bench_args, args.timeout_per_bench, echo=not args.quiet)
        runs[name], reports[name] = record, report
        tail = f": {record['stderr_tail'][-1]}" if record["status"] != "ok" and record["stderr_tail"] else ""
        print(f"== {name}: {record['status']} in {record['seconds']:.1f} s{tail}", flush=True)
        # Written after every benchmark, so a run cut off from outside still leaves a summary of what finished.
        _write_summary(build_summary(reports, runs), out_dir, command)
    summary = build_summary(reports, runs)
    _write_summary(summary, out_dir, command)
    _print_table(summary)
    print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'summary.md'}")
    crashed = [name for name, run in runs.items() if run.get("python_error")]
    if crashed:
        print(f"crashed: {', '.join(crashed)} (see {out_dir}/NAME.log)", file=sys.stderr)
    return 1 if crashed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
