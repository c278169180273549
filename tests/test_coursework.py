"""coursework.py: the student's copy, its check, and the README's equation table against coursework.TABLE.

One copy per entry of the table (written once for the module): in each, the grading tests of every entry run, and
exactly the entry's own fail (with those of the entries that list it under `needs`), each with the entry's
NotImplementedError; train.py stops at the blank (or, where training never calls it, runs to the end). Pasting the
original bodies back gives the original file, byte for byte, and the check then reports passed.
"""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

import coursework
from conftest import ROOT, TINY, user_error

pytestmark = pytest.mark.skipif(
    os.path.exists(os.path.join(ROOT, coursework.RECORD))
    and json.load(open(os.path.join(ROOT, coursework.RECORD)))["blanked"] != [],
    reason="a student's copy: these tests blank and restore the complete project")
ALL_TESTS = sorted({t for e in coursework.TABLE for t in e.tests})


def source(path, root=ROOT):
    with open(os.path.join(root, path)) as f:
        return f.read()


def paste_back(copy, entries):
    """Put the project's own bodies of the entries' functions back into the copy's files."""
    for path, todo in coursework.blanks_by_file(entries).items():
        original, lines = source(path), source(path).splitlines(keepends=True)
        bodies = {name: lines[slice(*coursework.body_span(original, name)[:2])] for _, name in todo}
        text = coursework.replace_bodies(source(path, copy), bodies)
        with open(os.path.join(copy, path), "w") as f:
            f.write(text)


def defined(path, name):
    """Is `name` (a test function, or a prefix ending in * or ...) defined at the top of the file?"""
    tree = ast.parse(source(path))
    prefix = name.rstrip("*.") if name.endswith(("*", "...")) else None
    return any(isinstance(n, ast.FunctionDef) and (n.name == name or prefix and n.name.startswith(prefix))
               for n in tree.body)


def coursework_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "coursework.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- the table and the blanking

def test_table_names_documented_functions_and_existing_disjoint_tests():
    seen_tests, seen_blanks = set(), set()
    for e in coursework.TABLE:
        assert set(e.needs) <= set(coursework.ENTRIES) - {e.eq}, e.eq
        for item in e.blanks:
            path, name = item.split(":")
            doc = ast.get_docstring(coursework.function_node(ast.parse(source(path)), name))
            assert doc and "Eq. " in doc and ("->" in doc or "Returns" in doc), (item, doc)
        for test in e.tests:
            path, _, name = test.partition("::")
            assert os.path.isfile(os.path.join(ROOT, path)) and (not name or defined(path, name)), test
        assert not seen_tests & set(e.tests) and not seen_blanks & set(e.blanks), e.eq
        seen_tests |= set(e.tests)
        seen_blanks |= set(e.blanks)


def test_blank_keeps_decorators_signature_docstring_and_pasting_back_gives_the_file():
    for path, todo in coursework.blanks_by_file(coursework.TABLE).items():
        text = source(path)
        blanked = coursework.blank(text, todo)
        before, after = ast.parse(text), ast.parse(blanked)
        for e, name in todo:
            old, new = coursework.function_node(before, name), coursework.function_node(after, name)
            assert ast.dump(old.args) == ast.dump(new.args), name
            assert [ast.dump(d) for d in old.decorator_list] == [ast.dump(d) for d in new.decorator_list], name
            assert ast.get_docstring(new, clean=False) == ast.get_docstring(old, clean=False)
            raise_ = new.body[-1]
            assert len(new.body) == 2 and isinstance(raise_, ast.Raise), name
            assert raise_.exc.func.id == "NotImplementedError"
            assert raise_.exc.args[0].value.startswith(f"Eq. {e.eq}: write {name}, ")
        lines = text.splitlines(keepends=True)
        bodies = {name: lines[slice(*coursework.body_span(text, name)[:2])] for _, name in todo}
        assert coursework.replace_bodies(blanked, bodies) == text, path


def test_copy_lists_the_project_without_runs_caches_earlier_copies_or_itself(tmp_path):
    for path in ("protoseg.py", "tests/test_x.py", "runs/a/last.pt", "__pycache__/p.pyc", "hw/coursework.json",
                 "hw/protoseg.py", "new/old.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    assert sorted(coursework.project_files(str(tmp_path), str(tmp_path / "new"))) == ["protoseg.py",
                                                                                       "tests/test_x.py"]
    listed = coursework.project_files(ROOT, os.path.join(ROOT, "hw"))
    assert {"coursework.py", "tests/test_coursework.py", "tests/conftest.py"} <= set(listed)
    assert not [p for p in listed if p.startswith(("runs/", ".git/")) or "__pycache__" in p]


def test_bad_input_is_one_error_line(capsys, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    assert f"--out {tmp_path / 'full'}: exists" in user_error(
        capsys, coursework.main, ["--blank", "14", "--out", str(tmp_path / "full")])
    err = user_error(capsys, coursework.main, ["--blank", "15", "--out", str(tmp_path / "new")])
    assert "--blank 15" in err and "1-2, 3, 6, 7, 8-10, 11, 12, 13, 14" in err
    assert "--out DIR" in user_error(capsys, coursework.main, ["--blank", "14"])
    assert f"--check {tmp_path / 'nowhere'}: not a folder" in user_error(
        capsys, coursework.main, ["--check", str(tmp_path / "nowhere")])
    assert "--help" in user_error(capsys, coursework.main, [])
    assert not (tmp_path / "new").exists()


def test_grade_reports_the_first_failing_assertion_and_what_a_test_waits_for():
    e13 = coursework.ENTRIES["13"]
    test = e13.tests[0]
    fail = coursework.Result(test, "failed", "AssertionError: assert 0.5 < 1e-05")
    assert coursework.grade(e13, [fail]) == f"failed: {test.split('::')[1]}: AssertionError: assert 0.5 < 1e-05"
    waits = coursework.Result(test, "failed", "NotImplementedError: Eq. 11: write ppc_loss, the ...")
    assert coursework.grade(e13, [waits]) == "not implemented: its tests need Eq. 11 first"
    assert coursework.grade(e13, []).startswith("failed: its tests did not run")


# ----------------------------------------------------------------------------- each entry blanked in a copy

@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    base = tmp_path_factory.mktemp("coursework")
    for e in coursework.TABLE:
        coursework.main(["--blank", e.eq, "--out", str(base / e.eq)])
    return base


@pytest.mark.parametrize("eq", list(coursework.ENTRIES))
def test_blank_fails_exactly_its_grading_tests_and_train_py_stops_there(copies, eq, tmp_path):
    e, copy = coursework.ENTRIES[eq], copies / eq
    flags = TINY if "--head" not in (e.train or ()) else TINY[:TINY.index("--num-prototypes")] + \
        TINY[TINY.index("--num-prototypes") + 2:]                               # a baseline has no prototypes
    train = subprocess.Popen([sys.executable, "train.py", *flags, "--iters", "1", *(e.train or ()), "--out-dir",
                              str(tmp_path)], cwd=copy, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results, tail = coursework.run_tests(copy, ALL_TESTS)
    out, err = train.communicate(timeout=300)
    assert results, tail
    failed = {r.test: r.message for r in results if r.outcome == "failed"}
    own = {r.test for r in results if e.covers(r.test)}
    dependents = [f for f in coursework.TABLE if eq in f.needs]
    assert own and own <= set(failed)
    assert set(failed) <= own | {r.test for r in results if any(f.covers(r.test) for f in dependents)}
    for f in dependents:                                                        # the dependence is real
        assert any(f.covers(t) for t in failed), f.eq
    for test, message in failed.items():
        assert message.startswith(f"NotImplementedError: Eq. {eq}: write "), (test, message)
    if e.train is None:
        assert train.returncode == 0, err[-2000:]
    else:
        assert train.returncode != 0
        assert err.strip().splitlines()[-1].startswith(f"NotImplementedError: Eq. {eq}: write "), err[-2000:]


def test_check_of_an_untouched_copy_reports_every_equation_passed(tmp_path):
    coursework.main(["--blank", "--out", str(tmp_path / "copy")])
    out = coursework_cli("--check", str(tmp_path / "copy"))
    lines = out.stdout.splitlines()
    assert [line.split()[1] for line in lines] == list(coursework.ENTRIES), out.stdout + out.stderr
    assert all(" passed (" in line for line in lines) and out.returncode == 0, out.stdout


def test_blank_8_10_and_14_check_not_implemented_then_pasted_back_passed(tmp_path):
    assert coursework_cli("--blank", "8-10", "14", "--out", "hw", cwd=tmp_path).returncode == 0
    out = coursework_cli("--check", "hw", cwd=tmp_path)
    assert out.returncode == 1 and out.stdout.splitlines() == [
        "Eq. 8-10   not implemented: sinkhorn", "Eq. 14     not implemented: momentum_update"]
    paste_back(tmp_path / "hw", [coursework.ENTRIES["8-10"], coursework.ENTRIES["14"]])
    for path in ("sinkhorn.py", "protoseg.py"):
        assert source(path, tmp_path / "hw") == source(path)
    out = coursework_cli("--check", "hw", cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stdout + out.stderr
    assert re.fullmatch(r"Eq\. 8-10   passed \(\d+ tests\)", lines[0]) and lines[1] == "Eq. 14     passed (1 test)"


# ----------------------------------------------------------------------------- the README's equation table

def readme_rows():
    """(equation numbers, the row's text) of each row of the README's table whose header starts with Eq."""
    lines = source("README.md").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*Eq\.?\s*\|", line))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        first = line.strip("|").split("|")[0]
        nums = {str(n) for a, b in re.findall(r"(\d+)(?:\s*-\s*(\d+))?", first) for n in range(int(a), int(b or a) + 1)}
        rows.append((nums, line))
    return rows


def names_in(row):
    """The row's code names ('module.function', 'Class.method') and test references ('file.py::test', a test
    prefix ending in * or ...; '::test' and a bare test name are in the file last named in the row)."""
    code, tests, last = [], [], None
    for token in re.findall(r"`([^`]+)`", row):
        if "::" in token or token.startswith("test_"):
            path, _, name = token.rpartition("::")
            last = path or last
            tests.append((last, name))
        elif re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", token):
            code.append(token)
    return code, tests


def resolve(name):
    """(file, qualname) where the README's code name is defined; module.name or a name in a root script."""
    head, _, rest = name.partition(".")
    candidates = [(head + ".py", rest)] if rest and os.path.isfile(os.path.join(ROOT, head + ".py")) else \
        [(f, name) for f in sorted(os.listdir(ROOT)) if f.endswith(".py")]
    for path, qualname in candidates:
        try:
            coursework.function_node(ast.parse(source(path)), qualname)
            return path, qualname
        except KeyError:
            pass
    raise AssertionError(f"README names `{name}`, defined nowhere")


def test_readme_equation_table_names_the_coursework_functions_and_tests():
    """Each README row of one coursework entry names at least one of the entry's functions, and every test it
    names is one of the entry's grading tests; every name in the table exists; every entry has a row. The README
    may name fewer tests (the table here is where all of them are listed) and the functions around the entry's."""
    rows, shown = readme_rows(), set()
    assert rows
    for nums, row in rows:
        code, tests = names_in(row)
        places = {resolve(name) for name in code}
        for path, name in tests:
            assert path and os.path.isfile(os.path.join(ROOT, path)) and defined(path, name), (path, name, row)
        mine = [e for e in coursework.TABLE if nums & set(coursework.numbers(e.eq))]
        if len(mine) != 1:                                                     # a row spanning the whole step
            continue
        e = mine[0]
        shown.add(e.eq)
        blanks = [tuple(item.split(":")) for item in e.blanks]
        assert any(p == bp and (n == bn or bn.startswith(n + ".")) for p, n in places for bp, bn in blanks), row
        for path, name in tests:
            prefix = name.rstrip("*.")
            assert e.covers(f"{path}::{name}") or path in e.tests or name.endswith(("*", "...")) and any(
                t.startswith(f"{path}::{prefix}") for t in e.tests), (name, e.eq)
    assert shown == set(coursework.ENTRIES)
