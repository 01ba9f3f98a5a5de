"""The package's modules import only from their own layer or below (the order is in vtimellm_jax/__init__.py)."""

import ast
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vtimellm_jax"
LAYERS = {
    "errors": 0, "cli_types": 0, "sharding": 0, "model_io": 0, "xla_flags": 0, "device_peaks": 0, "quiet": 0,
    "models": 1, "data": 1, "evaluation": 1,
    "convert": 2, "data_pipelines": 2,
    "video": 3,
    "inference": 4, "training": 4,
    "bench": 5, "quickstart": 5, "cli": 5,
    "configs": 6,
}
# Top-level directories of the repository that the package carries under its own name (links in a checkout).
LINKED = ("configs", "data_pipelines")


def _modules():
  """Yields every .py file of the package, through the links to the top-level directories."""
  for directory, _, files in os.walk(PACKAGE, followlinks=True):
    for name in files:
      if name.endswith(".py"):
        yield pathlib.Path(directory, name)


def _imports(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module, [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, []


def _top(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if parts[0] == "vtimellm_jax" and len(parts) > 1 else None


def test_every_module_has_a_layer():
  names = {p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0] for p in _modules()}
  assert names - {"__init__"} == set(LAYERS)


def test_no_module_imports_from_a_layer_above_it_or_a_cli_module():
  upward, cli_imports, top_level = [], [], []
  for path in _modules():
    rel = path.relative_to(PACKAGE)
    own = rel.stem if len(rel.parts) == 1 else rel.parts[0]
    if own == "__init__":
      continue
    for module, names in _imports(path):
      for name in [module, *names]:
        top = _top(name)
        if top in LAYERS and LAYERS[top] > LAYERS[own]:
          upward.append(f"{rel} imports {name} (layer {LAYERS[top]} above {LAYERS[own]})")
        if name.endswith("_cli") and own != "cli" and _top(name):
          cli_imports.append(f"{rel} imports {name}")
        if name.split(".")[0] in LINKED:
          top_level.append(f"{rel} imports {name} (installed, it is vtimellm_jax.{name})")
  assert not upward, "\n".join(upward)
  assert not cli_imports, "\n".join(cli_imports)
  assert not top_level, "\n".join(top_level)


def test_the_package_carries_the_top_level_directories():
  for name in LINKED:
    assert (ROOT / name).is_dir() and not (ROOT / name).is_symlink()
    assert (PACKAGE / name).is_symlink() and (PACKAGE / name).resolve() == (ROOT / name)


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE).with_suffix("")
  parts = ["vtimellm_jax", *rel.parts]
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circle():
  """No module imports (at module level or inside a function) one that imports it back, however far round."""
  modules = {_module_name(p): p for p in _modules()}
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    for module, names in _imports(path):
      for target in [module, *names]:
        if target in modules and target != name:
          graph[name].add(target)
  # Tarjan's strongly connected components: a component of more than one module is a circle.
  index, low, stack, on_stack, circles = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in graph[node]:
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        circles.append(sorted(component))

  for node in graph:
    if node not in index:
      visit(node)
  assert not circles, "\n".join(" <-> ".join(c) for c in circles)
