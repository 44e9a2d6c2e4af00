"""The tables and verdicts of ``bench/replay.py``: what one run measured, ratios against ours,
where ours loses and why, and the issue's targets."""

from __future__ import annotations

import statistics
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from replay_traces import Trace

# Max wait's bound: the default queueTimeout, so no request waits long enough to be refused. Not
# bench/scheduling.py's 60 s: here Flux jobs run up to a minute and are not preempted, so a
# request that arrives behind two of them waits ~95 s under any policy (H, seed 5).
MAX_WAIT = 120.0
TIE = (0.05, 1.0, 0.25)  # within 5%, or 1 swap, or 0.25 s: a tie


@dataclass
class Result:
    trace: str
    policy: str
    requests: int
    swaps: int
    waits: list[float]
    ooms: int
    refused: int
    failed: int
    load_s: float
    victims: Counter[str] = field(default_factory=Counter)
    oom_at: list[tuple[float, str]] = field(default_factory=list)  # (when, whose allocation)
    spins: int = 0  # times the scheduler's next deadline stayed in the past after a tick

    def pct(self, q: float) -> float:
        if not self.waits:
            return 0.0
        if q >= 1.0:
            return max(self.waits)
        return statistics.quantiles(self.waits, n=100, method="inclusive")[round(q * 100) - 1]


def git_rev() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src", "bench"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def ratio(other: float, ours: float) -> str:
    """How many times ``other`` is ``ours`` ("2.0x": the other has twice as much)."""
    if ours == 0:
        return "=" if other == 0 else "inf"
    return f"{other / ours:.1f}x"


def loses(ours: Result, other: Result) -> list[str]:
    """Why ``ours`` does worse than ``other`` beyond a tie (empty: it wins or ties)."""
    rel, swaps, secs = TIE
    why = []
    if ours.swaps > other.swaps + max(swaps, rel * other.swaps):
        why.append(f"swaps {ours.swaps} > {other.swaps}")
    if ours.pct(0.95) > other.pct(0.95) + max(secs, rel * other.pct(0.95)):
        why.append(f"p95 wait {ours.pct(0.95):.2f} > {other.pct(0.95):.2f} s")
    if ours.ooms > other.ooms:
        whose = ", ".join(f"{who} at {at / 3600:.1f} h" for at, who in ours.oom_at)
        why.append(f"OOMs {ours.ooms} > {other.ooms} (ours: {whose})")
    if ours.refused + ours.failed > other.refused + other.failed:
        why.append(f"refused+failed {ours.refused + ours.failed} > {other.refused + other.failed}")
    return why


def targets(results: dict[str, Result]) -> list[str]:
    """The issue's household targets against ours-backend; the misses."""
    ours, base = results["ours"], results["ours-backend"]
    missed = []
    if not ours.swaps * 2 <= base.swaps:
        missed.append(f"swaps {ours.swaps} vs {base.swaps}: not 2x fewer")
    p95, bp95 = ours.pct(0.95), base.pct(0.95)
    if not (p95 * 2 <= bp95 if bp95 > 0 else p95 == 0):
        missed.append(f"p95 wait {p95:.2f} vs {bp95:.2f} s: not 2x lower")
    if ours.ooms:
        missed.append(f"{ours.ooms} OOMs")
    if ours.pct(1.0) > MAX_WAIT:
        missed.append(f"max wait {ours.pct(1.0):.1f} s > {MAX_WAIT:g} s")
    return missed


def table(trace: Trace, results: dict[str, Result], markdown: bool) -> list[str]:
    head = ["policy", "swaps", "p50 wait", "p95 wait", "max wait", "OOMs", "refused", "load s"]
    rows = [
        [
            r.policy,
            str(r.swaps),
            f"{r.pct(0.5):.2f}",
            f"{r.pct(0.95):.2f}",
            f"{r.pct(1.0):.2f}",
            str(r.ooms) + (f" ({r.failed} failed)" if r.failed else ""),
            str(r.refused),
            f"{r.load_s:.0f}",
        ]
        for r in results.values()
    ]
    n = len(trace.requests)
    title = f"{trace.key}. {trace.title}: {n} requests"
    if markdown:
        out = [f"**{title}**", "", "| " + " | ".join(head) + " |"]
        out.append("| --- |" + " ---: |" * (len(head) - 1))
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return [*out, ""]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [title, fmt.format(*head), *(fmt.format(*row) for row in rows)]


def verdicts(trace: Trace, results: dict[str, Result], markdown: bool) -> tuple[list[str], bool]:
    """Ratios against ours, the losses with their reasons, the targets; and whether all held."""
    ours = results["ours"]
    bullet = "- " if markdown else "  "
    out: list[str] = []
    ok = True
    for key, other in results.items():
        if key == "ours":
            continue
        line = (
            f"{bullet}{key}/ours: swaps {ratio(other.swaps, ours.swaps)}, "
            f"p95 wait {ratio(other.pct(0.95), ours.pct(0.95))}, "
            f"max wait {ratio(other.pct(1.0), ours.pct(1.0))}"
        )
        why = loses(ours, other)
        if why:
            ok = False
            top = ", ".join(f"{v} {n}" for v, n in ours.victims.most_common(3)) or "none"
            theirs = ", ".join(f"{v} {n}" for v, n in other.victims.most_common(3)) or "none"
            line += f" -- ours LOSES: {'; '.join(why)} (ours evicted most: {top}; {key}: {theirs})"
        out.append(line)
    if trace.targets:
        missed = targets(results)
        ok = ok and not missed
        verdict = "met" if not missed else "MISSED: " + "; ".join(missed)
        out.append(
            f"{bullet}targets vs ours-backend (>= 2x fewer swaps, >= 2x lower p95 wait, 0 OOMs, "
            f"max wait <= {MAX_WAIT:g} s): {verdict}"
        )
    spins = [r.policy for r in results.values() if r.spins]
    if spins:
        out.append(
            f"{bullet}ANOMALY ({', '.join(spins)}): after a tick the scheduler's next deadline "
            "stayed in the past, so the broker's clock loop would tick again at once (a spin)"
        )
    return out, ok
