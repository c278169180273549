"""Coursework: a student's copy of this project with chosen equations left blank, and the check of their work.

    python coursework.py --list                        # the equations that can be blanked, their functions and tests
    python coursework.py --blank 8-10 14 --out hw      # hw/: the whole project with Eq. 8-10 and Eq. 14 blanked
    python coursework.py --check hw                    # a line per blanked equation (below)

A blanked function keeps its decorators, signature and docstring (the equation in the paper's notation, the shapes,
what it returns); its body becomes one `raise NotImplementedError("Eq. 14: ...")`. Everything else is the project as
it is, so `python train.py` in the copy stops at the first blank training reaches and nowhere else. The copy
records what was blanked in coursework.json; --check runs the grading tests of those equations in the
copy (of every equation where nothing is recorded) and exits 1 unless all passed. Each equation's line says:
passed; failed (the test, where, the first failing assertion); not implemented; did not parse (file:line), or did
not run when its tests import a file that does not parse; ran out of time (a test used its --time-limit of CPU time,
or the whole run its wall time).
"""
import argparse
import ast
import contextlib
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from collections import namedtuple
from dataclasses import dataclass

from commands import Parser, exit_with_error, ranged, run_command

ROOT = os.path.dirname(os.path.abspath(__file__))
RECORD = "coursework.json"                      # in a copy: {"blanked": ["8-10", "14"]}
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "runs"}   # never copied when the source is walked


@dataclass(frozen=True)
class Entry:
    eq: str                 # the paper's equation numbers, "8-10"
    what: str               # what the student writes
    blanks: tuple           # "file.py:function" or "file.py:Class.method"
    tests: tuple            # the grading tests: "file.py::test_name", or a whole test file
    note: str = ""          # why these functions, when more than one
    needs: tuple = ()       # entries whose functions the grading tests also call: graded once those are written
    train: tuple = ()       # flags with which `python train.py` reaches the blank; None: training never calls it
    also: str = ""          # what else stops at the blank

    def covers(self, test_id):
        """Is this pytest id (file::name, parameters dropped) one of the grading tests?"""
        return test_id in self.tests or test_id.split("::")[0] in self.tests


# The one list of what can be blanked, with the tests that grade it (tests/test_coursework.py checks the README's
# equation table against it).
P, W = "test_protoseg.py::", "tests/test_wiring.py::"
TRAINING = "every training step of a ProtoSeg head (train.py, toy2d.py) and the tests that take one"
FORWARD = "every ProtoSeg forward (training, evaluation, predict.py, atlas.py): most test files"
TABLE = (
    Entry("1-2", "the parametric baselines: softmax classifier (Eq. 1) and pixel queries (Eq. 2)",
          ("protoseg.py:SoftmaxHead.forward", "protoseg.py:QueryHead.forward"),
          (P + "test_eq1_eq4_softmax_head_is_unified_view_with_weights_as_prototypes",
           P + "test_eq2_eq4_query_head_is_unified_view_with_queries_as_prototypes"),
          train=("--head", "softmax"), also="--head softmax / query anywhere, and the tests that build those heads "
                                            "(test_models, test_segformer, test_swin)"),
    Entry("3", "the similarity i^T p = -<i, p> of every pixel to every prototype (Eq. 3)",
          ("protoseg.py:similarities",), (P + "test_eq3_similarities_are_minus_the_distance_for_every_pixel_and_prototype",), also=FORWARD),
    Entry("6", "the class scores -s, s the pixel-class distance (Eq. 6), whose argmax is the prediction (Eq. 5)",
          ("protoseg.py:ProtoSegHead.class_scores",),
          (P + "test_eq6_head_scores_are_minus_s_the_min_distance_over_k",
           P + "test_eq6_class_layernorm_normalises_each_pixels_c_scores",
           P + "test_eq3_eq5_head_predicts_the_class_of_the_nearest_prototype",
           W + "test_head_eq5_eq6_scores_are_cosines_of_unit_norm_embeddings"),
          needs=("3", "8-10"), also=FORWARD),
    Entry("7", "the cross-entropy of the class scores (Eq. 7)", ("protoseg.py:cross_entropy",),
          (P + "test_eq7_cross_entropy_matches_transcription_and_skips_ignore",
           P + "test_eq7_cross_entropy_is_the_weighted_mean_over_labelled_pixels_and_0_without_any"),
          also="every training step, of any head (train.py, toy2d.py), and the tests that take one"),
    Entry("8-10", "the within-class online clustering by Sinkhorn-Knopp",
          ("sinkhorn.py:sinkhorn", "sinkhorn.py:class_logsumexp"), ("tests/test_sinkhorn.py",),
          note="with its helper class_logsumexp, the column sums of every class at once",
          also=TRAINING + "; --proto-init data; the Sinkhorn panel of toy2d.py"),
    Entry("11", "the pixel-prototype contrast PPC (Eq. 11)", ("protoseg.py:ppc_loss",),
          (P + "test_eq11_ppc_matches_transcription_and_is_ce_over_scaled_similarities",
           P + "test_eq11_ppc_on_feature_maps_averages_over_labelled_pixels_only"), also=TRAINING),
    Entry("12", "the pixel-prototype distance PPD (Eq. 12)", ("protoseg.py:ppd_loss",),
          (P + "test_eq12_ppd_matches_transcription",
           P + "test_eq12_ppd_on_feature_maps_averages_over_labelled_pixels_only"), also=TRAINING),
    Entry("13", "the total loss L_CE + lambda1 L_PPC + lambda2 L_PPD", ("protoseg.py:seg_loss",),
          (W + "test_seg_loss_passes_tau_class_weight_lambdas_and_ignore_index_on",), needs=("7", "11", "12"),
          also="every training step, of any head (train.py, toy2d.py), and the tests that take one"),
    Entry("14", "the momentum update of the prototypes", ("protoseg.py:momentum_update",),
          (P + "test_eq14_momentum_update_matches_transcription",),
          also=TRAINING + "; --proto-init data"),
)
ENTRIES = {e.eq: e for e in TABLE}
BLANK = re.compile(r"NotImplementedError: Eq\. ([\d-]+): write ([\w.]+)")   # the message of a blank


def numbers(eq):
    first, _, last = eq.partition("-")
    return [str(n) for n in range(int(first), int(last or first) + 1)]


def entries(names):
    """The entries named on the command line ("8-10", or one number of it: "9"), in table order."""
    for name in names:
        if not any(name == e.eq or name in numbers(e.eq) for e in TABLE):
            exit_with_error(f"--blank {name}: not an equation that can be blanked; expected one of "
                            f"{', '.join(ENTRIES)}")
    return [e for e in TABLE if any(name == e.eq or name in numbers(e.eq) for name in names)]


def blanks_by_file(chosen):
    """{file: [(entry, qualname), ...]} of the chosen entries' blanks."""
    out = {}
    for e in chosen:
        for item in e.blanks:
            path, name = item.split(":")
            out.setdefault(path, []).append((e, name))
    return out


def where(entry):
    """'protoseg.py: f, g; sinkhorn.py: h'"""
    return "; ".join(f"{path}: {', '.join(n for _, n in todo)}" for path, todo in blanks_by_file([entry]).items())


# ----------------------------------------------------------------------------- blanking a function's body

def function_node(tree, qualname):
    node = tree
    for part in qualname.split("."):
        node = next((n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise KeyError(f"no {qualname}")
    return node


def body_span(text, qualname):
    """(first, end, indent): the 0-based line range of the function's body after its docstring, and its indent."""
    node = function_node(ast.parse(text), qualname)
    first = node.body[0]
    has_doc = ast.get_docstring(node, clean=False) is not None
    start = first.end_lineno if has_doc else first.lineno - 1
    return start, node.end_lineno, " " * first.col_offset


def replace_bodies(text, bodies):
    """text with each function's body after its docstring replaced: bodies {qualname: list of lines}. Every other
    line (decorators, signature, docstring, comments between functions) is kept as it is."""
    lines = text.splitlines(keepends=True)
    spans = sorted(((body_span(text, name)[:2], new) for name, new in bodies.items()), reverse=True)
    for (start, end), new in spans:
        lines[start:end] = new
    return "".join(lines)


def blank(text, entry_and_names):
    """text with each (entry, qualname)'s body replaced by raise NotImplementedError("Eq. N: write name, ...")."""
    bodies = {}
    for entry, name in entry_and_names:
        message = json.dumps(f"Eq. {entry.eq}: write {name}, {entry.what}")                   # a "..." literal
        bodies[name] = [f"{body_span(text, name)[2]}raise NotImplementedError({message})\n"]
    return replace_bodies(text, bodies)


# ----------------------------------------------------------------------------- the copy

def project_files(root, out):
    """The project's files relative to root: git's tracked and not-ignored ones when root is a checkout, else a
    walk. Never the output folder, nor an earlier copy inside the project (a folder holding coursework.json)."""
    try:
        listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = []
    if "protoseg.py" not in listed:
        listed = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            listed += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files)]
    out = os.path.abspath(out)
    copies = {p.split(os.sep)[0] for p in listed if p.endswith(os.sep + RECORD) and p.count(os.sep) == 1}

    def keep(path):
        full = os.path.abspath(os.path.join(root, path))
        return (os.path.isfile(full) and path.split(os.sep)[0] not in copies and full != out
                and not full.startswith(out + os.sep) and path != RECORD)
    return [p for p in listed if p and keep(p)]


def write_copy(out, chosen, root=ROOT):
    """The project copied to out (a new or empty folder) with the chosen entries' functions blanked."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        exit_with_error(f"--out {out}: exists and is not an empty folder; expected a new or empty folder")
    files = project_files(root, out)
    print(f"copying {len(files)} files of {root} to {out} ...", flush=True)
    for path in files:
        os.makedirs(os.path.join(out, os.path.dirname(path)), exist_ok=True)
        shutil.copy2(os.path.join(root, path), os.path.join(out, path))
    for path, todo in blanks_by_file(chosen).items():
        with open(os.path.join(root, path)) as f:
            text = blank(f.read(), todo)
        with open(os.path.join(out, path), "w") as f:
            f.write(text)
    with open(os.path.join(out, RECORD), "w") as f:
        json.dump({"blanked": [e.eq for e in chosen]}, f)
        f.write("\n")
    for e in chosen:
        print(f"Eq. {e.eq}: blanked {where(e)}")
    if os.path.abspath(out).startswith(root + os.sep):
        print(f"note: {out} is inside the project, so `python -m pytest` in {root} would collect its tests too")
    print(f"done: check the work with  python coursework.py --check {out}")


# ----------------------------------------------------------------------------- the check

# file::name (no parameters), passed / failed / skipped, why (the first line of the error), where it was raised
Result = namedtuple("Result", "test outcome message where", defaults=("",))
TIME_LIMIT = 60         # seconds of CPU time per grading test (--time-limit)
GRACE = 600             # seconds of wall time for the whole grading run on top of the tests' limits
# loaded into the grading run (-p): each test's call is stopped after the limit of CPU time, which a busy machine
# does not use up (wall time would), an endless loop does
PLUGIN = """import os, signal
import pytest
class OutOfTime(BaseException):            # not an Exception: a student's `except Exception` lets it through
    pass
def out_of_time(signum, frame):
    raise OutOfTime(f"used its {os.environ['COURSEWORK_TIME_LIMIT']} s of CPU time")
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    previous = signal.signal(signal.SIGPROF, out_of_time)
    signal.setitimer(signal.ITIMER_PROF, float(os.environ["COURSEWORK_TIME_LIMIT"]))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
"""


def run_tests(folder, tests, limit=TIME_LIMIT):
    """Run pytest on the test ids in folder, each test with `limit` seconds of CPU time and the whole run with
    GRACE + limit per test of wall time; (results, the tail of pytest's output)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        with open(os.path.join(tmp, "coursework_time_limit.py"), "w") as f:
            f.write(PLUGIN)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "coursework_time_limit",
               "--rootdir", ".", "--junitxml", report, *tests]
        env = {**os.environ, "COURSEWORK_TIME_LIMIT": str(limit),
               "PYTHONPATH": os.pathsep.join(filter(None, (tmp, os.environ.get("PYTHONPATH"))))}
        wall = GRACE + limit * len(tests)
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)        # killed whole with this command: the tests' children too
        try:
            out = proc.communicate(timeout=wall)[0]
        except subprocess.TimeoutExpired:
            return [], f"ran out of time: the grading run passed its {wall:g} s of wall time (a test that waits?)"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        lines = out.strip().splitlines() or [""]
        errors = [m.group(1) for m in map(re.compile(r"^E\s+(\w*(Error|Exception)\b.*)").match, lines) if m]
        tail = (errors or lines)[0 if errors else -1]                           # the first exception raised
        return (read_report(report) if os.path.exists(report) else []), tail


def read_report(report):
    """[Result] of pytest's junit XML."""
    results = []
    for case in ET.parse(report).iter("testcase"):
        test = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "").split("[")[0]
        bad = [c for c in case if c.tag in ("failure", "error")]
        outcome = "failed" if bad else "skipped" if case.find("skipped") is not None else "passed"
        message = (bad[0].get("message") or bad[0].text or "").strip().split("\n")[0] if bad else ""
        where = re.findall(r"^([\w.-][\w./-]*\.py:\d+): ", bad[0].text or "", re.M) if bad else []   # the copy's
        results.append(Result(test, outcome, message, where[-1] if where else ""))
    return results


def unparsed(folder):
    """{file: 'file:line: what'} of the copy's Python files (the root's and tests/) that do not parse."""
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.py")) + glob.glob(os.path.join(folder, "tests", "*.py"))):
        name = os.path.relpath(path, folder)
        try:
            with open(path, "rb") as f:
                compile(f.read(), name, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            found[name] = f"{name}:{getattr(e, 'lineno', '?')}: {getattr(e, 'msg', e)}"
    return found


def grade(entry, results, tail="", broken=None):
    """One line for the entry from the results of its grading tests; broken: unparsed(copy)."""
    own = [broken[f] for f in blanks_by_file([entry]) if broken and f in broken]
    if own:
        return f"did not parse: {own[0]}"
    mine = [r for r in results if entry.covers(r.test)]
    if not mine:
        return (f"did not run: {next(iter(broken.values()))} (its tests import that file)" if broken else
                tail if tail.startswith("ran out of time") else f"failed: its tests did not run ({tail})")
    blanks = [BLANK.search(r.message) for r in mine]
    todo = sorted({b.group(2) for b in blanks if b and b.group(1) == entry.eq})
    if todo:
        return f"not implemented: {', '.join(todo)}"
    late = [r for r in mine if "OutOfTime" in r.message]
    if late:
        return f"ran out of time: {late[0].test.split('::')[-1]} {late[0].message.split(': ', 1)[-1]}" + \
            (f" (stopped at {late[0].where})" if late[0].where else "")
    wrong = [r for r, b in zip(mine, blanks) if r.outcome == "failed" and not b]
    if wrong:
        where = f" ({wrong[0].where})" if wrong[0].where else ""
        return f"failed: {wrong[0].test.split('::')[-1]}{where}: {wrong[0].message}"[:300]
    waits = sorted({b.group(1) for b in blanks if b})
    if waits:
        return f"not implemented: its tests need Eq. {', '.join(waits)} first"
    return f"passed ({len(mine)} test{'s' * (len(mine) > 1)})"


def recorded(folder):
    """The entries blanked in a copy (its coursework.json); every entry where nothing is recorded."""
    path = os.path.join(folder, RECORD)
    if not os.path.exists(path):
        return list(TABLE)
    try:
        with open(path) as f:
            return [ENTRIES[eq] for eq in json.load(f)["blanked"]] or list(TABLE)
    except (ValueError, KeyError, TypeError):
        exit_with_error(f"--check {folder}: {path} is not what --blank writes; expected {{\"blanked\": [EQ, ...]}}, "
                        f"EQ among {', '.join(ENTRIES)}")


def check(folder, limit=TIME_LIMIT):
    """Print one line per recorded entry (every entry when none is recorded); True when all passed."""
    if not os.path.isdir(folder):
        exit_with_error(f"--check {folder}: not a folder; expected a copy written by --blank (or the project itself)")
    if importlib.util.find_spec("pytest") is None:
        exit_with_error("--check runs the tests with pytest, which is not installed: pip install pytest")
    chosen = recorded(folder)
    tests = sorted({t for e in chosen for t in e.tests})
    for path in {t.split("::")[0] for t in tests if not os.path.isfile(os.path.join(folder, t.split("::")[0]))}:
        exit_with_error(f"--check {folder}: no {path} in it; expected a copy of this project")
    broken = unparsed(folder)
    tests = sorted({t for e in chosen if not any(f in broken for f in blanks_by_file([e])) for t in e.tests})
    print(f"running {len(tests)} grading tests of Eq. {', '.join(e.eq for e in chosen)} in {folder}, {limit:g} s of "
          "CPU time each ...", file=sys.stderr, flush=True)
    results, tail = run_tests(folder, tests, limit) if tests else ([], "")
    lines = [f"Eq. {e.eq:<6} {grade(e, results, tail, broken)}" for e in chosen]
    print("\n".join(lines))
    return all(" passed (" in line for line in lines)


def table_text():
    """The table as --list prints it."""
    out = []
    for e in TABLE:
        reach = "never reaches it" if e.train is None else "stops at the blank" + " with " * bool(e.train)
        rows = [("writes", where(e)), ("why", e.note)]
        rows += [("graded" * (i == 0), t + " (all)" * ("::" not in t)) for i, t in enumerate(e.tests)]
        rows += [("needs", e.needs and f"Eq. {', '.join(e.needs)}, where blanked too: the grading tests call them"),
                 ("train.py", reach + " ".join(e.train or ())), ("also", e.also)]
        out.append(f"Eq. {e.eq}: {e.what}")
        out += [textwrap.fill(text, 118, initial_indent=f"  {label:8} ", subsequent_indent=" " * 11)
                for label, text in rows if text]
    return "\n".join(out)


def main(argv=None, progress=None):
    progress = {} if progress is None else progress
    p = Parser(prog="coursework.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    do = p.add_mutually_exclusive_group(required=True)
    do.add_argument("--list", action="store_true", help="print the table: each equation's functions and tests")
    do.add_argument("--blank", nargs="*", metavar="EQ",
                    help=f"the equations to blank, among {', '.join(ENTRIES)} (or one number of a group); "
                         "none: an untouched copy")
    do.add_argument("--check", metavar="DIR", help="run the grading tests of the equations blanked in DIR")
    p.add_argument("--out", metavar="DIR", help="with --blank: the copy's folder (new or empty)")
    p.add_argument("--time-limit", type=ranged(float, "> 0"), metavar="S",
                   help=f"with --check: the seconds of CPU time each grading test may use (default {TIME_LIMIT}); "
                        f"a test past it is stopped and its equation graded 'ran out of time'. The whole run may "
                        f"take {GRACE} s of wall time plus S per test (a test that waits without computing)")
    args = p.parse_args(argv)
    mode = "--list" if args.list else "--check" if args.check is not None else "--blank"
    for name, value, goes in (("--out", args.out, "--blank"), ("--time-limit", args.time_limit, "--check")):
        if value is not None and mode != goes:
            exit_with_error(f"{name} {value}: goes with {goes}, and {mode} does not use it; expected no {name} "
                            f"with {mode}")
    if args.list:
        print(table_text())
    elif args.check is not None:
        progress["doing"] = f"while grading {args.check}; no equation graded"
        raise SystemExit(0 if check(args.check, args.time_limit or TIME_LIMIT) else 1)
    else:
        if not args.out:
            exit_with_error("--blank needs --out DIR, the folder of the student's copy")
        progress["doing"] = f"while writing the copy {args.out}; it is incomplete: delete it and run again"
        write_copy(args.out, entries(args.blank))


if __name__ == "__main__":
    state = {}
    run_command(lambda: main(progress=state), lambda: f"interrupted {state.get('doing', 'while starting')}")
