"""coursework.py --check on what students write: code that is right, that computes the wrong shape, that never
returns, that is still blank, that does not parse. One copy, graded with a short CPU-time limit per test; each
equation gets its own line: passed / failed (where) / ran out of time / not implemented / did not parse (file:line)."""
import json
import os

import pytest

import coursework
from conftest import ROOT

pytestmark = pytest.mark.skipif(
    os.path.exists(os.path.join(ROOT, coursework.RECORD))
    and json.load(open(os.path.join(ROOT, coursework.RECORD)))["blanked"] != [],
    reason="a student's copy: these tests blank and restore the complete project")
LIMIT = 3            # seconds of CPU time per grading test: an endless loop uses it up, a busy machine does not


def write_bodies(copy, entry, body):
    """The copy's functions of the entry get the lines body(path, qualname, indent)."""
    for path, todo in coursework.blanks_by_file([entry]).items():
        with open(os.path.join(copy, path)) as f:
            text = f.read()
        new = {name: body(path, name, coursework.body_span(text, name)[2]) for _, name in todo}
        with open(os.path.join(copy, path), "w") as f:
            f.write(coursework.replace_bodies(text, new))


def original(path, name, indent):
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    return text.splitlines(keepends=True)[slice(*coursework.body_span(text, name)[:2])]


def test_check_says_per_equation_passed_failed_out_of_time_not_implemented_or_did_not_parse(tmp_path, capsys):
    copy = str(tmp_path / "hw")
    coursework.write_copy(copy, coursework.entries(["1-2", "3", "13", "14"]))
    write_bodies(copy, coursework.ENTRIES["3"], original)                                 # the right answer
    write_bodies(copy, coursework.ENTRIES["13"], lambda p, n, i: [f"{i}while True:\n", f"{i}    pass\n"])
    write_bodies(copy, coursework.ENTRIES["14"], lambda p, n, i: [f"{i}return torch.zeros(7, 3)\n"])  # wrong shape
    capsys.readouterr()
    assert coursework.check(copy, LIMIT) is False
    lines = dict(line.split(maxsplit=2)[1:] for line in capsys.readouterr().out.splitlines())
    assert lines["1-2"] == "not implemented: QueryHead.forward, SoftmaxHead.forward"
    passed = len(coursework.ENTRIES["3"].tests)
    assert lines["3"] == f"passed ({passed} test{'s' * (passed > 1)})"
    (test13, ), (file13, _) = coursework.ENTRIES["13"].tests, coursework.ENTRIES["13"].blanks[0].split(":")
    assert lines["13"].startswith(f"ran out of time: {test13.split('::')[1]} used its {LIMIT} s of CPU time "
                                  f"(stopped at {file13}:"), lines["13"]                  # the line of the loop
    (test14, ) = coursework.ENTRIES["14"].tests
    assert lines["14"].startswith(f"failed: {test14.split('::')[1]} ({test14.split('::')[0]}:"), lines["14"]
    assert "shape" in lines["14"], lines["14"]                                            # the failing assertion

    path, todo = next(iter(coursework.blanks_by_file([coursework.ENTRIES["8-10"]]).items()))
    with open(os.path.join(copy, path)) as f:
        text = f.read()
    name, indent = todo[0][1], coursework.body_span(text, todo[0][1])[2]
    text = coursework.replace_bodies(text, {name: [f"{indent}return (\n"]})
    with open(os.path.join(copy, path), "w") as f:                                     # does not parse
        f.write(text)
    with open(os.path.join(copy, coursework.RECORD), "w") as f:
        json.dump({"blanked": ["8-10"]}, f)
    assert coursework.check(copy, LIMIT) is False
    out = capsys.readouterr().out
    line = text.splitlines().index(f"{indent}return (") + 1
    assert out.startswith(f"Eq. 8-10   did not parse: {path}:{line}: ") and out.count("\n") == 1, out
    assert coursework.grade(coursework.ENTRIES["14"], [], "", coursework.unparsed(copy)) == \
        f"did not run: {out.split('did not parse: ')[1].strip()} (its tests import that file)"
