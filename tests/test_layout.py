"""The layout: the project's files import each other in one direction (leaves at the bottom, scripts at the top),
and the leaves need nothing of the project (labels.py not even torch)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
FILES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and not f.startswith(("test_", "conftest")))


def imports(name):
    """Every module `name`.py imports, anywhere in the file (function-local imports included)."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            found.add("__import__")
    return found


def test_project_imports_form_no_cycle_and_use_no_dynamic_import():
    graph = {f: imports(f) & set(FILES) for f in FILES}
    assert not any("__import__" in imports(f) for f in FILES)
    state = {}

    def visit(f, path):
        if state.get(f) == "done":
            return
        assert state.get(f) != "open", "import cycle: " + " -> ".join(path + [f])
        state[f] = "open"
        for g in sorted(graph[f]):
            visit(g, path + [f])
        state[f] = "done"

    for f in FILES:
        visit(f, [])


def test_leaves_import_nothing_of_the_project_and_labels_needs_only_numpy():
    for leaf in ("layers", "collectives", "labels"):
        assert not imports(leaf) & set(FILES), leaf
    assert imports("labels") <= {"numpy"}


def test_root_shows_the_method_and_the_tests_live_in_tests():
    """The root holds the scripts, the equation tests (test_protoseg.py), the README and its pages; every other
    test file, helper and fixture is under tests/."""
    root = os.listdir(ROOT)
    assert [f for f in root if f.startswith(("test_", "conftest")) and f != "test_protoseg.py"] == []
    assert "test_protoseg.py" in root and "testdata" not in root
    assert os.path.isdir(os.path.join(ROOT, "tests", "testdata"))


def test_every_function_of_the_scripts_fits_on_a_screen():
    """No function or method of the scripts at the root is longer than 60 lines (decorators included)."""
    long = []
    for f in FILES:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, f + ".py")).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1 + len(node.decorator_list)
                if lines > 60:
                    long.append(f"{f}.py:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
