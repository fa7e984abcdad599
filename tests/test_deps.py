"""dvc.yaml tracks exactly the code and params each stage uses (tools/deps.py), and params.yaml has only the
sections the stages declare.

A drift fails here naming the stage and the file (or key); `make deps` fixes it.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmcore.params import ParamsError, load_section, read_params, track_reads
from tests.conftest import REPO_ROOT
from tools import deps, reruns

SPEC = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
STAGES = deps.load_stages(SPEC)
SCRIPTED = [s for s in STAGES if s.module is not None]
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


# --------------------------------------------------------------------------------------------------
# dvc.yaml against the repository's code


@pytest.mark.parametrize("stage", SCRIPTED, ids=lambda s: s.name)
def test_code_deps_are_the_import_closure(stage):
    problems = deps.code_problems(stage)
    assert not problems, "\n".join([*problems, deps.FIX])


@pytest.mark.parametrize("stage", SCRIPTED, ids=lambda s: s.name)
def test_params_are_exactly_what_the_loader_reads(stage):
    problems = deps.params_problems(stage, PARAMS, deps.read_keys(stage, REPO_ROOT / "params.yaml"))
    assert not problems, "\n".join([*problems, deps.FIX])


def test_every_stage_runs_a_project_script():
    assert {s.name for s in SCRIPTED} == {s.name for s in STAGES}, "a stage whose command runs no stages/ script"


@pytest.mark.parametrize("stage", SCRIPTED, ids=lambda s: s.name)
def test_stage_reads_params_only_in_load_params(stage):
    """The params check loads through ``load_params``; a read elsewhere in the script would escape it."""
    readers = {"read_params", "load_section", "load_fields", "load_base_model"}
    tree = ast.parse(stage.script.read_text())
    loaders = [n for n in tree.body if isinstance(n, ast.FunctionDef) and re.fullmatch(r"load_(\w+_)?params", n.name)]
    assert loaders, f"{stage.script.name}: no load_params(path)"
    inside = {id(n) for loader in loaders for n in ast.walk(loader)}
    stray = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) in readers and id(n) not in inside
    ]
    assert not stray, f"{stage.script.name}: params.yaml read outside load_params at lines {stray}"


def test_write_is_a_no_op_on_the_repository():
    assert deps.generate() == (REPO_ROOT / "dvc.yaml").read_text()


# Not DVC's paths: the params file, dvc.yaml itself, resumable work folders and the judge's answer cache
NOT_DVC_PATHS = ("params.yaml", "dvc.yaml", ".cache/", "data/cache/", "data/hub/")  # data/hub: Hub downloads


def path_options(stage: deps.Stage) -> dict[str, str]:
    """The stage script's Path options as its dvc.yaml command sets them (its own defaults where it passes none)."""
    import importlib
    from pathlib import PurePath

    import typer

    command = typer.main.get_command(importlib.import_module(stage.module).app)
    ctx = command.make_context(stage.name, stage_args(stage), resilient_parsing=True)
    return {
        k: PurePath(v).as_posix()
        for k, v in ctx.params.items()
        if isinstance(v, PurePath) and not f"{PurePath(v).as_posix()}/".startswith(NOT_DVC_PATHS)
    }


def declared_paths(stage: deps.Stage) -> set[str]:
    """The stage's data deps and outputs (metrics and plots included), ``${...}`` filled in from params.yaml."""
    body = stage.body
    entries = [d for d in body.get("deps") or [] if not deps.is_code_dep(d)]
    entries += [
        e if isinstance(e, str) else next(iter(e)) for k in ("outs", "metrics", "plots") for e in body.get(k) or []
    ]
    # params.yaml (check-params' dep) and check-params' output order the stages; no script opens them by a path
    paths = {reruns.resolve(e, PARAMS, item="gpt2-124m") for e in entries} - {"params.yaml"}
    return paths if stage.name == "check-params" else paths - {"data/params-checked.txt"}


def under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@pytest.mark.parametrize("stage", SCRIPTED, ids=lambda s: s.name)
def test_the_paths_a_stage_uses_are_the_ones_dvc_yaml_declares(stage):
    """The script's path options (as the stage's command sets them) and dvc.yaml's deps and outs agree: every
    declared path and each option holds the other or lies in it (a path edited in the command and not in the deps
    or outs, or the other way round, fails here)."""
    options, declared = path_options(stage), declared_paths(stage)
    undeclared = {k: v for k, v in options.items() if not any(under(d, v) or under(v, d) for d in declared)}
    unused = sorted(d for d in declared if not any(under(d, v) or under(v, d) for v in options.values()))
    assert not undeclared, f"{stage.name}: options naming no declared dep or out: {undeclared}"
    assert not unused, f"{stage.name}: declared deps/outs no option of {stage.module} reaches: {unused}"


def path_literals(source: str) -> list[int]:
    """Lines of ``Path("...")`` / ``PurePath("...")`` calls on a string literal: a path named in the code itself."""
    return [
        n.lineno
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Call)
        and getattr(n.func, "id", getattr(n.func, "attr", None)) in ("Path", "PurePath", "PurePosixPath")
        and any(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in n.args)
    ]


def test_stage_scripts_name_no_paths():
    """Paths are declared once, in dvc.yaml: each stage's command passes every path its script reads or writes, and
    the scripts' path options are required (no ``Path("data/...")`` default to drift from dvc.yaml)."""
    found = {
        script.name: lines
        for script in sorted((REPO_ROOT / "stages").glob("*.py"))
        if (lines := path_literals(script.read_text()))
    }
    assert not found, f"Path literals in stages/ (pass the path from dvc.yaml's cmd instead): {found}"
    assert path_literals('x = typer.Option(Path("data/tokens"))\ny = pathlib.Path("a") / name\nz = Path(v)\n') == [1, 2]


def path_defaults(app) -> dict[str, object]:
    """The options of a Typer app whose default is a path (a ``Path``, or a string naming a file or folder)."""
    from pathlib import PurePath

    import typer

    def path_like(v: object) -> bool:
        return isinstance(v, PurePath) or isinstance(v, str) and bool(re.search(r"/|\.(ya?ml|json|txt)$", v))

    return {f"--{p.name}": p.default for p in typer.main.get_command(app).params if path_like(p.default)}


def test_stage_path_options_are_required():
    """No stage option defaults to a path: the command in dvc.yaml passes each (an optional input defaults to None)."""
    import importlib

    import typer

    found = {s.module: d for s in SCRIPTED if (d := path_defaults(importlib.import_module(s.module).app))}
    assert not found, f"path options with a default (make them required; dvc.yaml's cmd passes the path): {found}"
    demo = typer.Typer()

    @demo.command()
    def main(out: Path = typer.Option(Path("data/x")), params: str = typer.Option("params.yaml"), n: int = 1):
        pass

    assert path_defaults(demo) == {"--out": Path("data/x"), "--params": "params.yaml"}


def test_a_path_drift_between_script_and_dvc_yaml_is_caught():
    pretrain = next(s for s in SCRIPTED if s.name == "pretrain")
    outs = [o if o != "data/models/pretrain" else "data/models/pretrain-v2" for o in pretrain.body["outs"]]
    moved = deps.Stage(pretrain.name, {**pretrain.body, "outs": outs}, pretrain.module)
    with pytest.raises(AssertionError, match=r"'out': 'data/models/pretrain'"):
        test_the_paths_a_stage_uses_are_the_ones_dvc_yaml_declares(moved)
    cmd = pretrain.body["cmd"].replace("--out data/models/pretrain ", "--out data/models/pretrain-v2 ")
    assert cmd != pretrain.body["cmd"]
    passed = deps.Stage(pretrain.name, {**moved.body, "cmd": cmd}, pretrain.module)
    test_the_paths_a_stage_uses_are_the_ones_dvc_yaml_declares(passed)  # the command passes the new path: agreed


# --------------------------------------------------------------------------------------------------
# A drifted dvc.yaml: the check names stage and file, --write repairs it


def test_drift_is_named_and_make_deps_fixes_it(tmp_path, capsys):
    text = (REPO_ROOT / "dvc.yaml").read_text()
    start = text.index("\n  classify:\n")
    head, classify = text[:start], text[start:]  # the edits go to classify's entry alone
    assert classify.count("      - llmcore/data/spam.py\n") == 1  # classify's (check-params, above, has its own)
    classify = classify.replace("      - llmcore/data/spam.py\n", "", 1)
    extra = "      - stages/classify.py\n      - llmcore/serve/server.py\n"
    drifted = head + classify.replace("      - stages/classify.py\n", extra, 1)
    drifted = drifted.replace("      - base_model\n", "", 1)  # the first one is classify's
    drifted = drifted.replace("    cmd: python -m stages.report\n", "    cmd: python -m stages.report\n    # hi\n")
    (tmp_path / "dvc.yaml").write_text(drifted)
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    args = ["--dvc-yaml", str(tmp_path / "dvc.yaml"), "--params", str(tmp_path / "params.yaml")]
    assert deps.main(["--check", *args]) == 1  # python -m tools.deps --check
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert (
        "dvc.yaml: stage 'classify' misses llmcore/data/spam.py (stages/classify.py -> llmcore/data/spam.py)" in lines
    ), err
    assert "dvc.yaml: stage 'classify' lists llmcore/serve/server.py, which its code never imports" in lines
    assert "dvc.yaml: stage 'classify' reads param base_model but does not declare it" in lines
    assert lines[-1].startswith("fix: make deps")
    assert len(lines) == 4, err  # nothing about the other stages

    assert deps.main(["--write", *args]) == 0  # make deps
    assert capsys.readouterr().out == "dvc.yaml: code deps and params regenerated\n"
    assert (tmp_path / "dvc.yaml").read_text() == text.replace(
        "    cmd: python -m stages.report\n", "    cmd: python -m stages.report\n    # hi\n"
    )  # comments kept
    assert deps.check(tmp_path / "dvc.yaml", tmp_path / "params.yaml") == []


def test_write_adds_lists_to_a_new_stage(tmp_path):
    """A stage added with only its command gets its code deps and params from `make deps`."""
    text = (REPO_ROOT / "dvc.yaml").read_text()
    text += "\n  retokenize:\n    cmd: python -m stages.tokenize --out data/tokens2\n    outs:\n      - data/tokens2\n"
    (tmp_path / "dvc.yaml").write_text(text)
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    new = yaml.safe_load(deps.generate(tmp_path / "dvc.yaml", tmp_path / "params.yaml"))["stages"]
    assert new["retokenize"]["params"] == ["tokenize"]
    assert new["retokenize"]["deps"] == [d for d in new["tokenize"]["deps"] if not d.startswith("data/")]
    assert new["retokenize"]["outs"] == ["data/tokens2"]


# --------------------------------------------------------------------------------------------------
# The import walker on a made-up project


def write(root: Path, files: dict[str, str]) -> None:
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)


def test_closure_follows_every_kind_of_import(tmp_path):
    write(
        tmp_path,
        {
            "lib/__init__.py": "",
            "lib/a/__init__.py": "from . import b  # the package runs b\n",
            "lib/a/b.py": "from ..c import helper\n",
            "lib/a/unused.py": "",
            "lib/c.py": "import os\ndef helper():\n    from lib.d.e import thing  # late import\n    import lib.f\n",
            "lib/d/__init__.py": "",
            "lib/d/e.py": "thing = 1\n",
            "lib/f.py": "from lib.a import b as again\n",
            "lib/g.py": "",
            "app/__init__.py": "",
            "app/run.py": "import numpy\nfrom lib.a import b\nfrom lib.g import *\n",
        },
    )
    closure = deps.import_closure(tmp_path / "app/run.py", tmp_path, packages=("lib", "app"))
    got = sorted(deps.rel(f, tmp_path) for f in closure)
    assert got == [
        "app/__init__.py",
        "app/run.py",
        "lib/__init__.py",
        "lib/a/__init__.py",
        "lib/a/b.py",
        "lib/c.py",
        "lib/d/__init__.py",
        "lib/d/e.py",
        "lib/f.py",
        "lib/g.py",
    ]
    chain = deps.import_chain(closure, (tmp_path / "lib/d/e.py").resolve(), tmp_path)
    assert chain.startswith("app/run.py -> ") and chain.endswith("lib/c.py -> lib/d/e.py")


def test_imports_for_annotations_only_are_not_code_deps(tmp_path):
    """``if TYPE_CHECKING:`` never runs: the modules it names are not in the closure (llmcore/text/chat.py names the
    tokenizer that way, so the download stage does not rerun when the tokenizer changes)."""
    write(
        tmp_path,
        {
            "p/__init__.py": "",
            "p/a.py": "from typing import TYPE_CHECKING\nimport typing\nif TYPE_CHECKING:\n    from p import b\n"
            "if typing.TYPE_CHECKING:\n    import p.c\nelse:\n    import p.d\n",
            "p/b.py": "",
            "p/c.py": "",
            "p/d.py": "",
        },
    )
    assert deps.imported_modules(tmp_path / "p/a.py", tmp_path) == {"typing", "typing.TYPE_CHECKING", "p.d"}


def test_relative_imports_resolve_against_the_package(tmp_path):
    write(
        tmp_path, {"p/__init__.py": "from .q import x\n", "p/q.py": "from . import r\nfrom .. import p\n", "p/r.py": ""}
    )
    assert deps.imported_modules(tmp_path / "p/__init__.py", tmp_path) == {"p.q", "p.q.x"}
    assert deps.imported_modules(tmp_path / "p/q.py", tmp_path) == {"p", "p.r"}


@pytest.mark.parametrize(
    "cmd, module",
    [
        ("python -m stages.pretrain", "stages.pretrain"),
        ("python -m stages.import_weights --name ${item}", "stages.import_weights"),
        ("torchrun --standalone --nproc_per_node=2 -m stages.pretrain", "stages.pretrain"),
        ("python stages/report.py --x 1", "stages.report"),
        ("python -m dvc --version", None),
        ("echo hi", None),
    ],
)
def test_command_module(cmd, module):
    assert deps.command_module(cmd) == module


def test_compact_declares_whole_sections_only_when_every_key_is_read():
    data = {"a": {"x": 1, "y": {"z": 2, "w": 3}}, "b": 1, "c": {"k": [1, 2], "e": {}}}
    assert deps.compact({"a.x", "a.y.z", "a.y.w", "b"}, data) == ["a", "b"]
    assert deps.compact({"a.x", "a.y.z", "c.k", "c.e"}, data) == ["a.x", "a.y.z", "c"]
    assert deps.leaves(data) == ["a.x", "a.y.z", "a.y.w", "b", "c.k", "c.e"]


# --------------------------------------------------------------------------------------------------
# Tracking what a loader reads


def test_track_reads_records_values_taken_not_names_listed(tmp_path):
    (tmp_path / "params.yaml").write_text("s: {a: 1, b: {c: 2, d: [1, 2]}, e: {}}\nt: {u: 1}\n")
    with track_reads() as reads:
        raw = read_params(tmp_path / "params.yaml")
        assert "t" in raw and list(raw["s"]) == ["a", "b", "e"]  # names only: nothing read yet
        assert reads == set()
        copy = dict(raw["s"]["b"])
        assert copy == {"c": 2, "d": [1, 2]} and reads == {"s.b.c", "s.b.d"}
        raw["s"].get("e")
        assert reads == {"s.b.c", "s.b.d", "s.e"}
    assert isinstance(read_params(tmp_path / "params.yaml")["s"], dict)


def test_not_a_dep_fields_are_validated_but_not_recorded(tmp_path):
    from stages.import_weights import ImportParams

    (tmp_path / "params.yaml").write_text("import: {models: [gpt2-124m], corpus: the-verdict}\n")
    with track_reads() as reads:
        cfg = load_section("import", ImportParams, tmp_path / "params.yaml")
    assert cfg.models == ["gpt2-124m"] and reads == {"import.corpus"}
    (tmp_path / "params.yaml").write_text("import: {models: [3]}\n")
    with pytest.raises(ParamsError, match=r"import.models\[0\]: expected str, got 3"):
        load_section("import", ImportParams, tmp_path / "params.yaml")


# --------------------------------------------------------------------------------------------------
# params.yaml as a whole: an unknown section stops every stage


def stage_args(stage: deps.Stage) -> list[str]:
    """The stage's command line after its module, as DVC would run it (foreach items filled in)."""
    words = shlex.split(stage.body["cmd"].replace("${item}", "gpt2-124m"))
    return words[words.index(stage.module) + 1 :]


@pytest.fixture
def typo_workspace(tmp_path, monkeypatch):
    """params.yaml with `pretrian:` beside the repository's dvc.yaml; the stages run with it as cwd."""
    text = (REPO_ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text + "\npretrian:\n  train: {lr: 1.0e-3}\n")
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMCORE_MIRROR", str(tmp_path / "no-mirror"))  # never the network, whatever happens
    return tmp_path


@pytest.mark.parametrize("stage", SCRIPTED, ids=lambda s: s.name)
def test_unknown_section_stops_every_stage_with_one_line(typo_workspace, stage):
    import importlib

    app = importlib.import_module(stage.module).app
    result = CliRunner().invoke(app, stage_args(stage))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines == ["error: params.yaml: unknown section 'pretrian' (did you mean 'pretrain'?)"], result.output
    assert sorted(p.name for p in typo_workspace.iterdir()) == ["dvc.yaml", "params.yaml"]  # nothing written


def test_known_sections_come_from_the_stages_declarations(tmp_path):
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text() + "bogus_section_xyz: 1\n")
    with pytest.raises(ParamsError) as err:
        read_params(params)
    declared = sorted({p.split(".")[0] for s in STAGES for p in s.params})
    assert str(err.value) == f"{params}: unknown section 'bogus_section_xyz' (known: {', '.join(declared)})"
    assert set(declared) == set(PARAMS)  # every section of the repository's params.yaml is some stage's
    # outside a pipeline (no dvc.yaml beside the file) sections are not checked
    (tmp_path / "dvc.yaml").unlink()
    assert read_params(params)["bogus_section_xyz"] == 1


def test_a_stage_script_without_load_params_is_named(tmp_path):
    text = (REPO_ROOT / "dvc.yaml").read_text() + "\n  lint:\n    cmd: python -m stages.__init__ --check\n"
    (tmp_path / "dvc.yaml").write_text(text)
    problems = deps.check(tmp_path / "dvc.yaml", REPO_ROOT / "params.yaml")
    assert problems[-1].startswith("dvc.yaml: stage 'lint' runs stages/__init__.py, which has no load_params(path)")


def test_preferences_reads_only_its_keys_of_align():
    """One script per stage: `preferences` reads the pair-making keys of `align`, so align.beta reruns only DPO."""
    by_name = {s.name: s for s in STAGES}
    pref, align = by_name["preferences"], by_name["align"]
    assert (pref.module, align.module) == ("stages.preferences", "stages.align")
    assert pref.command is None and align.command is None
    read = deps.read_keys(pref, REPO_ROOT / "params.yaml")
    assert "evaluate.judge.model" in read and not any(k.startswith("evaluate.n_boot") for k in read)
    assert "align.dataset" in read and "align.pairs.seeds" in read
    assert not {"align.beta", "align.train.lr", "align.generate.seed"} & read
    assert {"align.beta", "align.train.lr"} <= deps.read_keys(align, REPO_ROOT / "params.yaml")


def test_every_stage_waits_for_check_params():
    """check-params reads params.yaml through every stage's loader, and every other stage depends on its output."""
    from stages import check_params

    scripts = {s.module for s in SCRIPTED} - {"stages.check_params"}
    assert {m.__name__ for m in check_params.STAGES} == scripts
    by_name = {s.name: s for s in STAGES}
    assert [d for d in by_name["check-params"].deps if not deps.is_code_dep(d)] == ["params.yaml"]
    assert by_name["check-params"].params == []  # the whole file is its dep
    assert SPEC["stages"]["check-params"]["outs"] == ["data/params-checked.txt"]
    missing = [s.name for s in STAGES if s.name != "check-params" and "data/params-checked.txt" not in s.deps]
    assert not missing, f"stages that do not depend on check-params' output: {missing}"


def test_the_download_stage_never_names_the_tokenizer():
    """download checks conversation files (llmcore.text.messages) but never tokenizes: no module of its closure
    mentions the tokenizer, not even for annotations, so a tokenizer edit cannot be a change download missed."""
    closure = deps.import_closure(REPO_ROOT / "stages" / "download.py")
    named = [
        f"{deps.rel(f)} imports {name}"
        for f in closure
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom | ast.Import)
        for name in ([node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])
        if name in ("llmcore.text.tokenizer", "llmcore.text.bpe")
    ]
    assert named == []
