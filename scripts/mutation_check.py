"""Mutation check: do the tests catch a broken guard?

For each guard in MUTANTS, a scratch copy of the repository gets one textual change that removes
the guard (each original snippet must occur exactly once, so the check fails loudly when the
code moves), and the few tests that should catch it run against that copy; every mutant must
make them fail. Before the mutants, the unmutated copy must pass the same tests, or a failure
would prove nothing. Prints one row per mutant: its tests, whether they caught it (and which
failed), and the seconds it took. Exits 1 unless every mutant was caught.

    .venv/bin/python scripts/mutation_check.py               # every mutant
    .venv/bin/python scripts/mutation_check.py --only cond_hi --only give_back
    .venv/bin/python scripts/mutation_check.py --snippets-only  # the table still matches
    .venv/bin/python scripts/mutation_check.py --no-baseline    # CI: the suite just passed

`--no-baseline` skips the unmutated run: for CI, which runs this right after the whole suite
passed on the same code (the copy's imports are still checked). Each mutant's tests stop at the
first failure (`-x`): one failing test catches it.

The copy holds the files git knows of (tracked, and untracked but not ignored) plus the built
extension (`python/zae_limiter/_native*.so`, from `pip install -e`); its tests import its own
package (`PYTHONPATH=<copy>/python` comes first), which the check verifies before running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path("python/zae_limiter")
DYNAMODB = PACKAGE / "storage" / "dynamodb"
REPOSITORY = str(DYNAMODB / "repository.py")
REQUESTS = str(DYNAMODB / "requests.py")
CLIENT = str(DYNAMODB / "client.py")
ENGINE = str(PACKAGE / "engine" / "engine.py")
LEASE = str(PACKAGE / "lease.py")
SLOTS = str(DYNAMODB / "slots.py")

STALE = "tests/reliability/test_stale_views.py"
CAPS_ALIKE = "tests/test_storage_contract.py::test_concurrency_cap_slots_alike"
CAPS_PROCESSES = (
    "tests/reliability/test_concurrency_caps.py::test_three_processes_never_hold_more_than_the_cap"
)
CAPS_FAULTS = (
    "tests/reliability/test_concurrency_caps.py"
    "::test_faults_on_takes_and_releases_lose_or_double_no_slot"
)
QUOTAS_ALIKE = (
    "tests/test_storage_contract.py::test_a_give_back_never_lands_in_another_window_alike"
)
QUOTA_CONTENTION = "tests/reliability/test_contention.py::test_one_quota_exact_ledger"
FAULTS = "tests/reliability/test_faults.py"
CHAOS = f"{FAULTS}::test_chaos"
LATE_WRITE = f"{FAULTS}::test_transient_fault_is_absorbed[delay-UpdateItem]"
CASCADE = f"{FAULTS}::test_cascade_parent_failure_gives_child_back"
HOT_PATH = "tests/test_repository_hot_path.py"
NEVER_RESENT = f"{FAULTS}::test_a_give_back_in_flight_is_never_resent"
NO_503_RETRY = f"{FAULTS}::test_a_give_back_is_not_retried_after_a_503"
TAKE_LANDED = f"{FAULTS}::test_a_take_past_its_deadline_is_held_once_it_landed"
FAIL_CLOSED_BOOKS = f"{FAULTS}::test_lease_calls_fail_closed"
CASCADE_CHILD = f"{FAULTS}::test_cascade_child_failure_gives_parent_back"
MIXED = f"{FAULTS}::test_a_write_mixing_a_take_and_a_give_back_is_never_resent"
HALF_ADJUST = f"{FAULTS}::test_half_landed_cascade_adjust_then_rollback_gives_back_exactly"
HALF_RELEASE = f"{FAULTS}::test_half_landed_cascade_release_then_rollback_gives_back_once"
BLOCK_BACK = (
    "tests/reliability/test_reservation_faults.py"
    "::test_failed_adjust_still_puts_its_give_back_in_the_block"
)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root


def vacuous(name: str, original: str, attr: str) -> Mutant:
    """A mutant of the condition `conditions.append(f"<condition>")` in the bucket write's
    encoder: made to hold whenever `attr` exists, so the guard is gone while its value
    placeholders stay in use (DynamoDB refuses unused ones) and the request stays valid."""
    head, tail = 'conditions.append(f"', '")'
    if not (original.startswith(head) and original.endswith(tail)):
        raise ValueError(f"{name}: not a condition of the builder: {original!r}")
    condition = original[len(head) : -len(tail)]
    replacement = f"{head}({condition} OR attribute_exists({attr})){tail}"
    return Mutant(name, REQUESTS, original, replacement, (STALE,))


# The bucket write's conditions are built as text by its one encoder
# (`requests.encode_bucket_write`): the limiter's path (`BucketRequests.update`) takes each write
# shape's expressions from it once and its values on every write, so a condition removed in the
# text is removed from every write the limiter sends, and a bound's value mutated is the value
# every write sends.
MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "write_id",  # each write id applies at most once: a late copy of a resent write
        REQUESTS,
        "conditions.append(f\"NOT ({wid} IN ({', '.join(slots)}))\")",
        'conditions.append(f"(attribute_exists({slots[0]}) OR attribute_not_exists({slots[0]}))")',
        (CHAOS, LATE_WRITE),
    ),
    Mutant(
        "resend_only_if_absent",  # after a lost response, resend only if the ring proves it
        REPOSITORY,
        "return bool(known_ids) and known_ids[0] in current.write_ids",
        "return True",
        # The chaos run meets a full ring only by chance; the unit test meets it every time.
        ("tests/test_storage.py::test_a_lost_write_is_surely_absent_only_when_the_ring_proves_it",
         CHAOS),
    ),
    # not full at the writer's now (relative writes); full at its now (writes at full) and
    # enough tokens (checked relative writes); a bucket the decision saw missing is created
    # only if still missing in both layouts
    vacuous("cond_lo", 'conditions.append(f"{fa} >= {lo}")', "{fa}"),
    vacuous("cond_hi", 'conditions.append(f"{fa} <= {hi}")', "{fa}"),
    vacuous("create_if_absent", 'conditions.append(f"attribute_not_exists({fa})")', "{fa}"),
    Mutant(
        "fast_path_cond_lo",  # the limiter's own value of the lower bound
        REQUESTS,
        'put({"N": str(w.cond_lo)})',
        'put({"N": str(-(10**37))})',
        (STALE,),
    ),
    Mutant(
        "fast_path_cond_hi",  # the limiter's own value of the upper bound
        REQUESTS,
        'put({"N": str(w.cond_hi)})',
        'put({"N": str(10**37)})',
        (STALE,),
    ),
    Mutant(
        "give_back",  # a partial cascade gives back what it took
        ENGINE,
        "if committed and check:",
        "if committed and check and False:",
        (CASCADE,),
    ),
    Mutant(
        "round_results_sorted",  # a write that landed beside a failed one is given back too
        ENGINE,
        "still.append(i)\n                        failure = failure or result",
        "raise result",
        (CASCADE_CHILD,),
    ),
    Mutant(
        "lease_adjust",  # adjust writes
        LEASE,
        'await self._force(self._each(deltas), "adjust")',
        "pass",
        (
            "tests/test_limiter.py::test_adjust_can_go_negative_and_release_caps_at_burst",
            "tests/test_cost.py::test_exit_costs_nothing_and_adjust_or_rollback_one_call_per_entity",
        ),
    ),
    Mutant(
        "give_back_not_resent",  # a give-back whose copy may be in flight is not sent again
        REPOSITORY,
        "            if give_back:\n                # No fence keeps",
        "            if False:\n                # No fence keeps",
        (NEVER_RESENT,),
    ),
    Mutant(
        "mixed_write_is_a_give_back",  # one give-back part makes the whole write a give-back
        REPOSITORY,
        "return any(w.delta_milli < 0 or w.mode == core.WRITE_ADD for w in writes)",
        "return all(w.delta_milli < 0 or w.mode == core.WRITE_ADD for w in writes)",
        (MIXED,),
    ),
    Mutant(
        "give_back_503_ambiguous",  # a give-back is retried only after a throttle, not a 503
        REPOSITORY,
        "retryable = THROTTLE_CODES if give_back else RETRYABLE_CODES",
        "retryable = RETRYABLE_CODES",
        (NO_503_RETRY,),
    ),
    Mutant(
        "botocore_sends_once",  # botocore's own retries would resend a give-back after a 503
        CLIENT,
        'retries={"total_max_attempts": 1, "mode": "standard"}',
        'retries={"total_max_attempts": 3, "mode": "standard"}',
        (NO_503_RETRY,),
    ),
    Mutant(
        "lease_gives_before_write",  # a give-back leaves the lease's books whatever its fate
        LEASE,
        "gives = [{name: n for name, n in e.items() if n < 0} for e in each]\n"
        "        self._add_each(gives)",
        "gives = [{} for e in each]",
        (NEVER_RESENT, FAIL_CLOSED_BOOKS),
    ),
    Mutant(
        "lease_takes_once_landed",  # a take enters the lease's books once it landed
        LEASE,
        "takes = [{name: n for name, n in e.items() if n > 0} for e in each]",
        "takes = [{} for e in each]\n        self._add_each(each)",
        (TAKE_LANDED,),
    ),
    Mutant(
        "landed_half_recorded",  # the engine reports the half of a cascade that landed
        ENGINE,
        "                        if landing is not None:\n"
        "                            landing.landed.append(targets[i])",
        "                        pass",
        (HALF_ADJUST,),
    ),
    Mutant(
        "refused_give_back_kept",  # a give-back certainly refused stays in the lease's books
        LEASE,
        "            elif landing.refused_at(target):",
        "            elif False:",
        (HALF_RELEASE,),
    ),
    Mutant(
        "block_takes_give_back_on_failure",  # a lease's give-back to a block survives a failure
        str(PACKAGE / "engine" / "reservations.py"),
        "            for holding, back in backs:\n                holding.block.add(back)\n"
        "            if landing is not None:\n                landing.landed.extend(",
        "            if landing is not None:\n                landing.landed.extend(",
        (BLOCK_BACK,),
    ),
    Mutant(
        "unconfirmed_give_backs_counted",  # the ledger counts what may not have come back
        ENGINE,
        "                self._unconfirmed([targets[i] for i in unknown], "
        "[amounts[i] for i in unknown], exc)",
        "                pass",
        (NEVER_RESENT, NO_503_RETRY),
    ),
    Mutant(
        "deadline",  # an operation waits on DynamoDB at most its deadline
        str(PACKAGE / "deadline.py"),
        "        if self._seconds is not None:\n            self._timeout = asyncio.timeout(",
        "        if False:\n            self._timeout = asyncio.timeout(",
        ("tests/reliability/test_deadline.py::test_reads_are_bounded_by_the_deadline",),
    ),
    Mutant(
        "default_deadline_by_endpoint",  # 1 s unless the endpoint is on loopback
        str(PACKAGE / "deadline.py"),
        "return LOOPBACK_DEADLINE_SECONDS if is_loopback(endpoint_url) else",
        "return LOOPBACK_DEADLINE_SECONDS if True else",
        ("tests/reliability/test_deadline.py::test_the_default_deadline_follows_the_endpoint",),
    ),
    Mutant(
        "top_up_ahead",  # a block under its low watermark is refilled in the background
        str(PACKAGE / "engine" / "reservations.py"),
        "        if low and not self._closing:",
        "        if False:",
        ("tests/test_reservations.py::test_steady_demand_never_waits_for_a_top_up",),
    ),
    # Concurrency caps and quotas: each guard removed from the DynamoDB request only (the memory
    # backend keeps it), so the contract suite sees the two backends part, and the processes
    # sharing a cap see it over-admit.
    Mutant(
        "slot_count_bound",  # a take fits the cap: never more than max_in_flight held
        SLOTS,
        'f"(attribute_not_exists({ref}) OR {ref} <= {value(num_av(check.at_most))})"',
        'f"(attribute_not_exists({ref}) OR {ref} <= {value(num_av(check.at_most))}"\n'
        '                f" OR attribute_exists({ref}))"',
        (CAPS_ALIKE, CAPS_PROCESSES),
    ),
    Mutant(
        "slot_entry_exists",  # a release or renewal applies only while the lease's entry is there
        SLOTS,
        'conditions.append(f"attribute_exists({ref})")',
        'conditions.append(f"(attribute_exists({ref}) OR attribute_not_exists({ref}))")',
        (CAPS_ALIKE, CAPS_FAULTS),
    ),
    Mutant(
        "quota_same_window",  # a write made on one window's view is refused in another window
        REQUESTS,
        'conditions.append(f"{qw} = {window}")',
        'conditions.append(f"({qw} = {window} OR attribute_exists({qw}))")',
        (QUOTAS_ALIKE, QUOTA_CONTENTION),
    ),
)
PENDING: tuple[str, ...] = ()


def repository_files(root: Path) -> list[str]:
    """What git knows of: tracked files, and untracked ones not ignored (work in progress)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    return sorted({name for name in out.decode().split("\0") if name})


def make_copy(root: Path, scratch: Path) -> None:
    for name in repository_files(root):
        source = root / name
        if source.is_file():  # a tracked file deleted in the work tree is skipped
            target = scratch / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    native = sorted((root / PACKAGE).glob("_native*.so"))
    if not native:
        sys.exit(f"no built extension in {root / PACKAGE}: run pip install -e '.[dev]' first")
    for library in native:
        shutil.copy2(library, scratch / PACKAGE / library.name)


def missing_snippets(scratch: Path, mutants: tuple[Mutant, ...]) -> list[str]:
    problems = []
    for m in mutants:
        text = (scratch / m.path).read_text()
        count = text.count(m.original)
        if count != 1:
            problems.append(
                f"mutant {m.name!r}: snippet found {count} times (must be once) in {m.path}: "
                f"{m.original!r}"
            )
    return problems


def environment(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(scratch / "python"), env.get("PYTHONPATH")) if p
    )
    env["ZAE_RELIABILITY_SIZE"] = "ci"  # the size the mutants were shown to be caught at
    env.pop("ZAE_LIMITER_NATIVE", None)  # the extension the limiter uses by default
    return env


def check_imports_copy(scratch: Path) -> None:
    probe = "import zae_limiter, zae_limiter._native as n; print(zae_limiter.__file__, n.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=scratch,
        env=environment(scratch),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for path in out:
        if not Path(path).resolve().is_relative_to(scratch.resolve()):
            sys.exit(f"the scratch copy's tests would import {path}, not the copy")


@dataclass
class Run:
    seconds: float
    status: int
    failed: list[str]


def run_tests(scratch: Path, tests: tuple[str, ...], report: Path) -> Run:
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *tests,
            "-q",
            "-p",
            "no:cacheprovider",
            "--timeout=120",
            "-x",
            "-n0",  # a mutant's few tests: workers would cost more than they save
            f"--junitxml={report}",
        ],
        cwd=scratch,
        env=environment(scratch),
        capture_output=True,
        text=True,
        timeout=600,
    )
    failed = []
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}")
    if proc.returncode not in (0, 1):  # 2-5: interrupted, internal or usage error, no tests
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
    return Run(time.monotonic() - started, proc.returncode, failed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    parser.add_argument(
        "--snippets-only",
        action="store_true",
        help="only check that every mutant's snippet occurs exactly once (no tests run)",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the unmutated run (the selected tests just passed in the whole suite)",
    )
    args = parser.parse_args()
    mutants = tuple(m for m in MUTANTS if not args.only or m.name in args.only)
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"unknown mutants: {sorted(unknown)}")

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zae-mutation-") as tmp:
        scratch = Path(tmp) / "repo"
        make_copy(ROOT, scratch)
        problems = missing_snippets(scratch, mutants)
        if problems:
            print("the mutation table no longer matches the code:", *problems, sep="\n  ")
            return 1
        if args.snippets_only:
            print(f"every snippet occurs once: {', '.join(m.name for m in mutants)}")
            return 0
        check_imports_copy(scratch)
        reports = Path(tmp) / "reports"
        reports.mkdir()

        selected = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        baseline = (
            Run(0.0, 0, [])
            if args.no_baseline
            else run_tests(scratch, selected, reports / "baseline.xml")
        )
        rows = [("(none: the unmutated copy)", selected, baseline.status == 0, baseline)]
        if baseline.status != 0:
            print(f"the unmutated copy fails the selected tests: {baseline.failed}")
        else:
            for m in mutants:
                path = scratch / m.path
                original = path.read_text()
                path.write_text(original.replace(m.original, m.replacement, 1))
                try:
                    run = run_tests(scratch, m.tests, reports / f"{m.name}.xml")
                finally:
                    path.write_text(original)
                rows.append((m.name, m.tests, run.status == 1 and bool(run.failed), run))

    print(f"\n{'mutant':<28} {'caught':<7} {'seconds':>7}  tests run (failed)")
    for name, tests, ok, run in rows:
        caught = ("passes" if ok else "FAILS") if run is baseline else ("yes" if ok else "NO")
        shown = ", ".join(t.rpartition("/")[2] for t in tests)
        print(f"{name:<28} {caught:<7} {run.seconds:7.1f}  {shown}")
        if run is not baseline and run.failed:
            print(f"{'':<45}failed: {', '.join(run.failed)}")
    for name in PENDING:
        print(f"{name:<28} {'-':<7} {'-':>7}  (not filled in yet: see the TODO in MUTANTS)")
    print(f"\ntotal: {time.monotonic() - started:.0f} s")
    return 0 if all(ok for _, _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
