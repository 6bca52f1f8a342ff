"""The tree keeps the shape ARCHITECTURE.md describes: short functions with few parameters, the
scaffolding in ip2p/tiny/ never imported by a real run, no private imports across modules, and
every SDXL-specific name behind the model-family seam (ip2p/models/)."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ip2p"
MAX_PARAMETERS, MAX_LINES = 7, 60


def _modules(exclude: tuple[str, ...] = ()):
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if not relative.startswith(exclude):
            yield relative, ast.parse(path.read_text(encoding="utf-8"))


def test_no_function_has_more_than_seven_parameters_or_sixty_lines():
    too_big = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
                lines = node.end_lineno - node.lineno + 1
                if len(params) > MAX_PARAMETERS or lines > MAX_LINES:
                    too_big.append(f"{name}:{node.lineno} {node.name}: {len(params)} parameters, {lines} lines")
    assert not too_big, "\n".join(too_big)


def _imports(tree) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def test_production_code_never_imports_the_tiny_scaffolding():
    offenders = [f"{name} imports {module}" for name, tree in _modules(exclude=("ip2p/tiny/",))
                 for module, _ in _imports(tree) if module.startswith("ip2p.tiny")]
    assert not offenders, "\n".join(offenders)


def test_no_private_name_is_imported_from_another_module():
    offenders = [f"{name} imports {n} from {module}" for name, tree in _modules()
                 for module, names in _imports(tree) if module.startswith("ip2p")
                 for n in names if n.startswith("_") and not n.startswith("__")]
    assert not offenders, "\n".join(offenders)


def test_sdxl_specific_names_live_behind_the_model_family_seam():
    sdxl_only = re.compile(r"text_encoder_2|tokenizer_2|input_ids_2|StableDiffusionXL|compute_time_ids")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if relative.startswith(("ip2p/models/", "ip2p/tiny/")):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if sdxl_only.search(code):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
