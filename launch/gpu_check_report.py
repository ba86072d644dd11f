"""launch/gpu_check.sh's reporter: one part's outputs -> PART.json and the one-line summary it prints.

    python3 launch/gpu_check_report.py PART KIND OUT_DIR RC SECONDS

KIND: ``junit`` (OUT_DIR/PART.xml from pytest), ``jsonl`` (JSON lines in OUT_DIR/PART.log, e.g.
``largefr bench head --json``), ``train`` (OUT_DIR/PART/metrics.jsonl of a ``largefr train`` run) or
``plain`` (only the exit status). Standard library only.
"""
from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def junit(out: Path, part: str) -> tuple[dict[str, Any], str]:
    path = out / f"{part}.xml"
    if not path.is_file():
        return {"error": f"{path} missing"}, "no test report"
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                message = (child.get("message") or "").splitlines()
                cases.append({"name": case.get("name"), "outcome": outcome, "message": message[0] if message else ""})
                break
        else:
            cases.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    line = f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    return {**counts, "passed": passed, "cases": cases}, line


def _storage(r: dict[str, Any]) -> str:
    """' W bf16' for a 16-bit W row of `largefr bench head` (fp32, and rows of other benches: nothing)."""
    return f" W {r['weight_dtype']}" if r.get("weight_dtype", "fp32") != "fp32" else ""


def jsonl(out: Path, part: str) -> tuple[dict[str, Any], str]:
    rows = []
    for text in (out / f"{part}.log").read_text(errors="replace").splitlines():
        if text.startswith("{"):
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append(f"C={r['num_classes']:,} r={r['sample_rate']} {r['dtype']}{_storage(r)}: skipped")
        elif "step_ms" in r:
            memory = f" mem {r['max_memory_allocated_mb']:.0f}/{r['planned_mb']:.0f} MB" if "max_memory_allocated_mb" in r else ""
            lines.append(f"C={r['num_classes']:,} r={r['sample_rate']} {r['dtype']}{_storage(r)}: step {r['step_ms']:.2f} ms "
                         f"floor {r['floor_ms']:.2f} ms x{r['step_over_floor']:.2f}{memory}")
        elif "loader_over_memory" in r:
            lines.append(f"{r['loader_images_per_s']:.0f} img/s with the loader, {r['memory_images_per_s']:.0f} from "
                         f"memory, ratio {r['loader_over_memory']:.3f}")
    return {"results": rows}, "; ".join(lines) or "no results"


def train(out: Path, part: str) -> tuple[dict[str, Any], str]:
    path = out / part / "metrics.jsonl"
    if not path.is_file():
        return {"error": f"{path} missing"}, "no metrics"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]  # the first interval holds start-up
    accuracy = [r[k] for r in records for k in r if k.startswith("val/") and k.endswith("_acc")]
    losses = [r["loss"] for r in records if "loss" in r]
    steps = [r.get("step", 0) for r in records]
    result = {
        "steps": max(steps) if steps else 0,
        "images_per_s_median": statistics.median(rates) if rates else None,
        "final_loss": losses[-1] if losses else None,
        "verification_accuracy": accuracy[-1] if accuracy else None,
        "records": records,
    }
    line = (f"{result['steps']} steps, {result['images_per_s_median'] or 0:.0f} images/s, loss "
            f"{result['final_loss'] if result['final_loss'] is not None else float('nan'):.3f}, verification accuracy "
            f"{result['verification_accuracy'] if result['verification_accuracy'] is not None else float('nan'):.3f}")
    return result, line


def main(argv: list[str]) -> int:
    part, kind, out, rc, seconds = argv[0], argv[1], Path(argv[2]), int(argv[3]), float(argv[4])
    readers = {"junit": junit, "jsonl": jsonl, "train": train}
    try:
        details, line = readers[kind](out, part) if kind in readers else ({}, "")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        details, line = {"error": f"{type(exc).__name__}: {exc}"}, f"report unreadable ({exc})"
    status = "ok" if rc == 0 else ("TIMEOUT" if rc in (124, 137) else f"FAILED rc={rc}")
    (out / f"{part}.json").write_text(json.dumps({"part": part, "status": status, "rc": rc, "seconds": seconds,
                                                  **details}, indent=1) + "\n")
    print(f"[gpu_check] {part:<12} {status:<11} {seconds:6.0f} s  {line}".rstrip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
