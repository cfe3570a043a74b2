"""The one-way layer rule and the registry rule, read from the source (every import, also those inside
functions). A failure names the file, the line and the import or comparison that breaks the rule."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "megadiff"

# Lower layers never import higher ones. The longest matching prefix decides a module's layer.
LAYERS: dict[str, int] = {
    # 0: stdlib/omegaconf/numpy only — configs load and launch code runs without torch
    "megadiff": 0, "megadiff.config": 0, "megadiff.registry": 0, "megadiff.utils": 0, "megadiff.data.format": 0,
    "megadiff.diffusion.catalog": 0, "megadiff.model.catalog": 0, "megadiff.train.lr": 0,
    # 1: building blocks (torch, megatron-core)
    "megadiff.dist": 1, "megadiff.data": 1, "megadiff.model": 1, "megadiff.diffusion": 1,
    # 2: checkpoints, including loading one for inference
    "megadiff.checkpoint": 2,
    # 3: the trainer and checkpoint conversion
    "megadiff.train": 3, "megadiff.convert": 3,
    # 4: evaluation and tracking (callbacks the CLI hands to the trainer)
    "megadiff.eval": 4, "megadiff.tracking": 4,
    # 5: sweeps (plan, launch, fit) on top of training and tracking
    "megadiff.sweeps": 5,
    # 6: command lines
    "megadiff.cli": 6, "megadiff.commands": 6,
}
CLI_MODULE_NAMES = ("cli", "cli_common")  # */cli.py and the command handlers below are layer 6
CLI_SUFFIX = "_cmd"
FORBIDDEN = {"launch": "the Slurm launcher plugs in through entry points", "data_pipelines": "idem (data CLI)",
             "ray": "only data_pipelines/ uses Ray", "configs": "recipes are data, not code"}
MLFLOW_HOME = "megadiff.tracking"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(mod: str) -> int | None:
    last = mod.rsplit(".", 1)[-1]
    if mod.startswith("megadiff.") and (last in CLI_MODULE_NAMES or last.endswith(CLI_SUFFIX)):
        return 6
    best = None
    for prefix, layer in LAYERS.items():
        if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if layer_of(f"{node.module}.{a.name}") is not None and node.module.startswith("megadiff")]
    return out


def library_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_library_module_has_a_layer():
    missing = [module_name(p) for p in library_files() if layer_of(module_name(p)) is None]
    assert not missing, f"modules without a layer in tests/test_architecture.py LAYERS: {missing}"


def test_imports_point_down():
    bad = []
    for path in library_files():
        me = module_name(path)
        mine = layer_of(me)
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if top in FORBIDDEN:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({FORBIDDEN[top]})")
            elif top == "mlflow" and not me.startswith(MLFLOW_HOME):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports mlflow outside {MLFLOW_HOME}")
            elif top == "megadiff":
                theirs = layer_of(target)
                if theirs is not None and theirs > mine:
                    bad.append(f"{path.relative_to(ROOT)}:{line} ({me}, layer {mine}) imports {target} (layer {theirs})")
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: a layer-1 module importing the trainer is reported."""
    bad = tmp_path / "megadiff" / "model" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from megadiff.train.trainer import Trainer\n")
    found = [(line, t) for line, t in imports_of(bad)]
    assert found == [(2, "megadiff.train.trainer"), (2, "megadiff.train.trainer.Trainer")]
    assert layer_of("megadiff.model.x") == 1 < layer_of("megadiff.train.trainer") == 3


def _registered_names() -> set[str]:
    from megadiff.diffusion.catalog import OBJECTIVES, SAMPLERS

    return set(OBJECTIVES.names()) | set(SAMPLERS.names())


def _name_tests(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    def consts(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [v for e in node.elts for v in consts(e)]
        return []

    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):  # name == "ar", name in ("mdlm", ...)
            for side in [node.left, *node.comparators]:
                hits += [(node.lineno, v) for v in consts(side) if v in names]
        elif isinstance(node, ast.Dict):  # per-name tables
            hits += [(node.lineno, f"dict key {k.value!r}") for k in node.keys
                     if isinstance(k, ast.Constant) and k.value in names]
        elif isinstance(node, ast.Subscript):  # fits["ar"]
            hits += [(node.lineno, f"[{v!r}]") for v in consts(node.slice) if v in names]
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):  # hand-written lists of names
            listed = [v for v in consts(node) if v in names]
            if len(listed) >= 2:
                hits.append((node.lineno, f"list of names {listed}"))
    return sorted(set(hits))


def test_no_objective_or_sampler_name_tests_outside_the_diffusion_package():
    names = _registered_names()
    bad = []
    for path in library_files():
        if path.is_relative_to(PKG / "diffusion"):
            continue
        bad += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in _name_tests(ast.parse(path.read_text()), names)]
    assert not bad, "per-type logic outside the registries (use the catalogue's traits):\n" + "\n".join(bad)


def test_the_name_test_checker_sees_a_comparison():
    tree = ast.parse("if cfg.objective == 'ar' or s in ('ancestral', 'x'):\n    pass\nM = {'mdlm': 1}\n"
                     "for o in ('mdlm', 'llada'):\n    fits['ar']\n")
    assert _name_tests(tree, {"ar", "ancestral", "mdlm", "llada"}) == [
        (1, "ancestral"), (1, "ar"), (3, "dict key 'mdlm'"), (4, "list of names ['mdlm', 'llada']"), (5, "['ar']")]


def test_catalogue_entries_resolve_to_their_implementations():
    """Every declared objective, sampler and schedule is registered by the module its entry names."""
    from megadiff.diffusion.catalog import OBJECTIVES, SAMPLERS, SCHEDULES

    for reg in (OBJECTIVES, SAMPLERS, SCHEDULES):
        for name in reg.names():
            assert reg.get(name) is not None, (reg.kind, name)
