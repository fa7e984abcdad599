"""Exact reruns: an edit to a file reruns exactly the stages whose code (or params) it is, checked with DVC.

``tools/reruns.py`` copies the pipeline to a scratch folder, puts a placeholder at every output and records them
with ``dvc commit`` (no data, no run: it works on a clean clone), then appends a comment to one file at a time
and asks ``dvc status`` which stages changed. ``check-params`` reads params.yaml through every stage's loader, so
every file some stage runs is its code too: it reruns on any code edit, in a second or two, and its output never
changes (see test_check_params_*).

Also here: params.yaml's typos stop ``dvc repro`` at ``check-params``, before DVC deletes any stage's outputs.
"""

from __future__ import annotations

import pytest
import yaml

from tools import reruns

pytestmark = pytest.mark.slow

EVERY_STAGE = {
    "check-params",
    "download",
    "tokenize",
    "pretrain",
    "classify",
    "instruct",
    "preferences",
    "align",
    "evaluate",
    "report",
}  # (import, export, benchmark: none by default)
MODEL_USERS = {"pretrain", "classify", "instruct", "preferences", "align", "evaluate"}  # stages that build a GPT

# file edited -> the stages `dvc status` must name (check-params aside, added below)
TABLE = {
    # the model config and its presets: the stages that build a model, not download, tokenize or report
    "llmcore/models/config.py": MODEL_USERS,
    # the tokenizer: tokenize and what loads a model folder (download's content checks do not tokenize)
    "llmcore/text/tokenizer.py": {"tokenize"} | MODEL_USERS,
    # params schemas, each beside what it configures
    "stages/tokenize.py": {"tokenize"},  # TokenizeParams
    "stages/pretrain.py": {"pretrain"},  # PretrainParams
    "llmcore/training/config.py": {"pretrain", "classify", "instruct", "align", "evaluate"},  # TrainConfig, hardware
    "llmcore/data/pairs.py": {"preferences", "align"},  # PreferencesParams (align's schema extends it)
    "llmcore/models/responses.py": {"instruct", "preferences", "align"},  # GenerateParams, generate_responses
    "llmcore/eval/judge.py": {"preferences", "evaluate"},  # JudgeConfig: the judge (align never asks it)
    # one script per stage: no stage imports another's
    "stages/instruct.py": {"instruct"},
    "stages/preferences.py": {"preferences"},
    "stages/align.py": {"align"},
    "stages/download.py": {"download"},
    # the training loop and the report
    "llmcore/training/loop.py": {"pretrain", "classify", "instruct", "align", "evaluate"},
    "llmcore/report/card.py": {"report"},
    # what every stage runs: the params loader and the common helpers
    "llmcore/params.py": EVERY_STAGE,
    "llmcore/common.py": EVERY_STAGE,
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return reruns.scratch_pipeline(tmp_path_factory.mktemp("reruns"))


def test_an_edit_reruns_exactly_the_stages_that_run_the_file(pipeline):
    got = reruns.reruns(pipeline, list(TABLE))
    wrong = {
        f: (sorted(got[f] - want - {"check-params"}), sorted(want - got[f]))
        for f, want in TABLE.items()
        if got[f] != want | {"check-params"}
    }
    assert not wrong, "file: (named but not expected, expected but not named): " + repr(wrong)


def test_a_params_edit_reruns_only_the_stages_that_read_the_key(pipeline):
    params = pipeline / "params.yaml"
    text = params.read_text()
    cases = {
        ("align", "beta"): {"align"},
        ("align", "split_seed"): {"preferences", "align"},
        ("model", "n_layers"): {"pretrain"},
        ("tokenize", "vocab_size"): {"tokenize"},
    }
    try:
        for (section, key), want in cases.items():
            data = yaml.safe_load(text)
            data[section][key] = data[section].get(key, 2) * 2
            params.write_text(yaml.safe_dump(data, sort_keys=False))
            # report: its params table shows every section but download
            assert reruns.changed_stages(pipeline) == want | {"check-params", "report"}, (section, key)
    finally:
        params.write_text(text)


# --------------------------------------------------------------------------------------------------
# check-params


@pytest.fixture(scope="module")
def checked_pipeline(tmp_path_factory):
    return reruns.scratch_pipeline(tmp_path_factory.mktemp("checked"), run=("check-params",))


@pytest.fixture
def checked(checked_pipeline):
    """A scratch pipeline whose check-params stage has really run (its output is the real one), up to date; each
    test leaves it so."""
    good = (checked_pipeline / "params.yaml").read_text()
    yield checked_pipeline
    (checked_pipeline / "params.yaml").write_text(good)
    reruns.dvc(checked_pipeline, "repro", "--single-item", "check-params")
    assert reruns.changed_stages(checked_pipeline) == set()


def edit_params(repo, edit) -> None:
    data = yaml.safe_load((repo / "params.yaml").read_text())
    edit(data)
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda p: p["tokenize"].update(vocab_sise=p["tokenize"].pop("vocab_size")),
            "error: tokenize.vocab_sise: unknown key (known: corpus, kind, vocab_size,",
        ),
        (
            lambda p: p.update(pretrian=p["pretrain"]),
            "error: params.yaml: unknown section 'pretrian' (did you mean 'pretrain'?)",
        ),
        (lambda p: p["align"].update(beta=0), "error: align.beta: expected > 0, got 0"),
    ],
    ids=["key-typo", "section-typo", "bad-value"],
)
def test_a_params_typo_stops_dvc_repro_before_any_output_is_deleted(checked, edit, message):
    own = checked / "data/params-checked.txt"  # check-params' own output, which DVC deletes before running it
    before = {p: p.read_bytes() for p in (checked / "data").rglob("*") if p.is_file() and p != own}
    before.update({p: p.read_bytes() for p in (checked / "reports").rglob("*") if p.is_file()})
    assert checked / "data/tokens/placeholder.txt" in before and checked / "data/align/pairs.json" in before
    good = (checked / "params.yaml").read_text()
    edit_params(checked, edit)
    proc = reruns.dvc(checked, "repro", check=False)
    assert proc.returncode != 0
    assert [line for line in proc.stdout.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'check-params':"
    ], proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr
    after = {p: p.read_bytes() for p in before if p.is_file()}
    assert after == before  # every output of every later stage is still there, unchanged
    # the typo fixed, check-params writes its constant line again and nothing else is out of date
    (checked / "params.yaml").write_text(good)
    reruns.dvc(checked, "repro")
    assert reruns.changed_stages(checked) == set()


def test_check_params_output_is_constant_so_a_valid_edit_reruns_nothing_else(checked):
    output = (checked / "data/params-checked.txt").read_text()
    edit_params(checked, lambda p: p["tokenize"].update(vocab_size=512))
    assert reruns.changed_stages(checked) == {"check-params", "tokenize", "report"}
    reruns.dvc(checked, "repro", "--single-item", "check-params")
    assert (checked / "data/params-checked.txt").read_text() == output
    assert reruns.changed_stages(checked) == {"tokenize", "report"}  # not the stages downstream of check-params
