"""Facts about the code's shape that keep the engine growable (issue 2.1), checked with ast: engine functions stay
short (step reads as schedule -> execute -> postprocess), nothing assigns into a module's globals(), and LLM is a
plain class with its documented API (no attribute proxying)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "internvl_engine"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.end_lineno - node.lineno + 1


def test_engine_functions_are_short():
    long = [(p.name, f.name, n) for p in sorted((PKG / "engine").glob("*.py")) for f, n in _functions(p) if n > 40]
    assert not long, long
    steps = [n for f, n in _functions(PKG / "engine" / "llm_engine.py") if f.name == "step"]
    assert steps and steps[0] < 15, steps


def test_nothing_assigns_into_module_globals():
    """No globals() anywhere in the package; no `global` rebinding on the step's path (ops, layers, models,
    engine). Lazily filled caches elsewhere (the tokenizer files, the Pillow probe) are not per-step state."""
    hits = []
    for p in PKG.rglob("*.py"):
        step_path = p.relative_to(PKG).parts[0] in ("ops", "layers", "models", "engine")
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "globals":
                hits.append(f"{p.relative_to(PKG)}:{node.lineno}")
            if step_path and isinstance(node, ast.Global):
                hits.append(f"{p.relative_to(PKG)}:{node.lineno} global {node.names}")
    assert not hits, hits


def test_llm_does_not_proxy_the_engine():
    tree = ast.parse((PKG / "llm.py").read_text())
    llm = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LLM")
    names = {n.name for n in llm.body if isinstance(n, ast.FunctionDef)}
    assert not names & {"__getattr__", "__setattr__", "__getattribute__"}


def test_engine_class_and_sequence_stay_narrow():
    """Issue 3.1: LLMEngine at most 250 lines (intake, health, metrics and outputs live in their own rooms), Sequence
    at most 20 fields (what callers have seen of a sample is the output processor's OutputState)."""
    tree = ast.parse((PKG / "engine" / "llm_engine.py").read_text())
    engine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LLMEngine")
    assert engine.end_lineno - engine.lineno + 1 <= 250
    tree = ast.parse((PKG / "engine" / "sequence.py").read_text())
    seq = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Sequence")
    fields = [n for n in seq.body if isinstance(n, ast.AnnAssign)]
    assert len(fields) <= 20, [ast.unparse(f.target) for f in fields]
