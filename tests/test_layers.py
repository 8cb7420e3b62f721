"""The package's layers (docs/design.md): every import, at the top of a module or inside a
function, goes to the same layer or one below; library code never imports a command; and no
modules import each other in a circle. Read from the source, so it sees lazy imports too."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# lowest first; a module may import its own layer and the ones before it
LAYERS = ("util", "functional", "kernels", "network", "io", "diffusion", "training", "measure",
          "experiments", "commands")


def module_name(path):
    """jitfast.<...> of a file of jitfast/ or of kernels/ (installed as jitfast.kernels)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "kernels":
        parts = ("jitfast",) + parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module):
    """A jitfast module's layer: its subpackage, or "commands" for the top-level modules."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "commands"


def imports(path, modules):
    """The jitfast modules a file imports (`from jitfast.x import y` counts as jitfast.x.y when
    that is a module, else jitfast.x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) + 1 - node.level]
                                + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m.startswith("jitfast.") and m in modules and m != name}


def graph():
    paths = [p for folder in ("jitfast", "kernels") for p in (ROOT / folder).rglob("*.py")]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def test_imports_stay_in_their_layer_or_go_down():
    upward = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})"
              for m, deps in graph().items() for d in sorted(deps)
              if layer_of(m) != "commands" and m != "jitfast"
              and LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m))]
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_circles():
    edges = graph()
    circles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(edges.get(module, ())):
            if dep.startswith(module + ".") or module.startswith(dep + "."):
                continue  # a package and its own modules
            if state.get(dep) == "open":
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_rules_see_what_they_check():
    """The graph holds the imports the rules are about (a parse that found nothing would pass)."""
    edges = graph()
    assert "jitfast.network.model" in edges["jitfast.io.jit_weights"]
    assert "jitfast.functional.ops" in edges["jitfast.kernels.norm"]
    assert "jitfast.kernels" in edges["jitfast.network.backend"]  # inside a function
    assert layer_of("jitfast.train") == "commands" and layer_of("jitfast.io.layouts") == "io"
