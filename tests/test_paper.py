"""The paper's numbers all come from generated macros: every \\Res.../\\Cfg... used in paper/*.tex is
defined by the generator and traces to a metric key (or a params key); the PDF builds with latexmk
on fake results where LaTeX is installed."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_figures import write_fake_results  # noqa: E402

from qlora_rlhf.stages import paper  # noqa: E402

from conftest import REPO

SOURCES = REPO / "paper"


@pytest.fixture
def params() -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.pop("eval")          # the paper stage's params: run, model, data, sft, rm, ppo
    return raw


@pytest.fixture
def results(tmp_path) -> Path:
    return write_fake_results(tmp_path / "run")


def _trace(macro: paper.Macro, results: Path, params: dict) -> object:
    """The raw value a macro's `source` points at, read straight from the file it names."""
    kind, key = macro.source.rsplit(":", 1) if not macro.source.startswith("params:") else ("params", macro.source[7:])
    if kind == "params":
        value = params
        for part in key.split("."):
            value = value[part]
        return value
    path = results / kind
    if path.suffix == ".json":
        return json.loads(path.read_text())[key]
    row_key, column = key.split(".")
    first = {"summary.csv": "policy", "winrate.csv": "judge", "gold_by_category.csv": "category"}[path.name]
    rows = {row[first]: row for row in csv.DictReader(path.open())}
    return rows[row_key][column]


def test_every_macro_the_paper_uses_is_generated_and_traced(results, params):
    macros = paper.build_macros(results / "metrics", results / "eval", params)
    used = paper.used_macros(SOURCES)
    # the generated tables use macros too
    tables = paper.setup_table(macros) + paper.training_table(macros) + paper.summary_table(list(paper.POLICIES)) \
        + paper.winrate_table(["reward_model", "gold"])
    used |= set(paper.MACRO_USE.findall(tables))
    assert used, "the paper uses no generated macros"
    assert sorted(used - set(macros)) == []
    for name in used:
        macro = macros[name]
        assert re.fullmatch(r"[A-Za-z]+", name)
        raw = _trace(macro, results, params)
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            assert macro.value == paper.fmt(raw)
        elif isinstance(raw, str) and re.fullmatch(r"-?[\d.eE+-]+", raw):
            assert macro.value == paper.fmt(raw)


@pytest.mark.parametrize("held_out", [True, False])
def test_the_ppo_row_gives_the_held_out_curve_with_intervals_where_the_run_has_one(tmp_path, params, held_out):
    run = write_fake_results(tmp_path / "run", held_out=held_out)
    table = paper.training_table(paper.build_macros(run / "metrics", run / "eval", params))
    rows = table[table.index("PPO & "):].split("\n")[:3]
    if held_out:
        assert rows[0].startswith("PPO & held-out RM ") and r"\ResPpoHeldOutRewardCiLowFirst" in rows[0]
        assert rows[1].startswith(r" & held-out gold \ResPpoHeldOutGoldMeanFirst")
        assert rows[2].startswith(" & held-out KL ") and r"\ResPpoHeldOutKlCiHighLast" in rows[2]
    else:
        assert rows[0].startswith(r"PPO & reward \ResPpoRewardMeanFirst") and rows[1] == r"\bottomrule"


def test_paper_sources_hold_no_literal_results():
    """Numbers in prose would bypass the generator: only layout numbers (widths, 95% CI) are allowed."""
    for tex in SOURCES.glob("*.tex"):
        text = paper._strip_comments(tex.read_text())
        text = re.sub(r"\[[^\]]*\]", "", text)                       # optional args: widths, margins
        text = re.sub(r"\{(0?\.\d+)?\\linewidth\}", "", text)
        text = re.sub(r"95\\%|4-bit|_\d", "", text)                   # method facts, math subscripts
        numbers = re.findall(r"(?<![A-Za-z\\])\d+(?:\.\d+)?", text)
        assert numbers == [], f"{tex.name}: literal numbers {numbers}"


def test_macros_file_defines_each_macro_once(results, params):
    macros = paper.build_macros(results / "metrics", results / "eval", params)
    text = paper.render_macros(macros)
    names = re.findall(r"\\newcommand\{\\([A-Za-z]+)\}", text)
    assert len(names) == len(set(names)) == len(macros)
    assert r"\newcommand{\ResSftPerplexitySft}{3.41}" in text
    assert r"\newcommand{\ResEvalWinrateGold}{0.64}" in text
    lr = params["sft"]["learning_rate"]  # params.yaml's value, rendered in scientific notation
    mantissa, exponent = f"{lr:.1e}".split("e")
    assert rf"\newcommand{{\CfgSftLearningRate}}{{\ensuremath{{{mantissa}\times 10^{{{int(exponent)}}}}}}}" in text


def test_formatting():
    assert paper.fmt(3.4123) == "3.41"
    assert paper.fmt(-0.4) == r"\ensuremath{-}0.40"
    assert paper.fmt(12.04) == "12.0"
    assert paper.fmt(40) == "40"
    assert paper.fmt(float("nan")) == "--"
    assert paper.fmt("") == "--"
    assert paper.camel("reward_mean_first") == "RewardMeanFirst"
    assert paper.camel("top_5") == "TopFive"
    assert paper.escape("50% of $x_1 & {y}") == r"50\% of \$x\_1 \& \{y\}"


def test_missing_metric_key_is_a_clear_error(results, params, tmp_path):
    data = json.loads((results / "metrics" / "rm.json").read_text())
    del data["accuracy"]
    (results / "metrics" / "rm.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(paper.PaperError, match=r"\\ResRmAccuracy"):
        paper.write_paper(out, results / "metrics", results / "eval", results / "figures", params, pdf=False)


def test_missing_latexmk_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(paper.shutil, "which", lambda name: None)
    with pytest.raises(paper.PaperError, match=r"apt-get install \$\(cat scripts/apt-packages.txt\)"):
        paper.latexmk_path()


@pytest.mark.skipif(shutil.which("latexmk") is None, reason="latexmk is not installed")
def test_pdf_builds_on_fake_results(results, params, tmp_path):
    pytest.importorskip("seaborn")
    from qlora_rlhf.config import Config
    from qlora_rlhf.paths import RunPaths

    config = Config.model_validate(yaml.safe_load((REPO / "params.yaml").read_text()))
    paths = RunPaths(results)
    from qlora_rlhf.stages import figures

    figures.run(config, paths)
    paper.run(config, paths)
    out = paths.paper
    assert (out / "paper.pdf").read_bytes()[:5] == b"%PDF-"
    assert (out / "paper.pdf").stat().st_size > 50_000
    assert (out / "macros.tex").is_file()
    summary = (out / "summary.md").read_text()
    sft = json.loads((results / "metrics" / "sft.json").read_text())
    assert f"{sft['perplexity_base']:.2f} (base) -> {sft['perplexity_sft']:.2f} (SFT)" in summary
    assert "gold-judge score" in summary and "nan" not in summary.lower()
    for table in ("setup", "training", "summary", "winrate", "samples"):
        assert (out / "tables" / f"{table}.tex").is_file()
    assert not list(out.glob("*.aux"))
    log = (out / "paper.log") if (out / "paper.log").exists() else None
    assert log is None or "Undefined control sequence" not in log.read_text(errors="replace")


def test_best_of_n_at_ppos_kl_is_interpolated_in_sqrt_kl(results):
    """The fake frontier is linear in KL (score = a + KL): at PPO's KL the interpolation in sqrt(KL)
    between the two neighbouring n, the n whose analytic KL it is, and PPO's gold gap; no value beyond
    the largest n."""
    import math

    table = list(csv.DictReader((results / "best_of_n" / "best_of_n.csv").open()))
    kl = 0.3
    (lo, hi), x = [(r, s) for r, s in zip(table, table[1:]) if float(r["kl"]) <= kl <= float(s["kl"])][0], math.sqrt(kl)
    w = (x - float(lo["sqrt_kl"])) / (float(hi["sqrt_kl"]) - float(lo["sqrt_kl"]))
    expected = (1 - w) * float(lo["gold_mean"]) + w * float(hi["gold_mean"])
    macros = {m.name: m for m in paper.best_of_n_macros(results / "best_of_n", kl, 0.61)}
    assert macros["ResBestOfNAtPpoKlGoldMean"].value == paper.fmt(expected)
    assert macros["ResBestOfNAtPpoKlGoldGap"].value == paper.fmt(0.61 - expected)
    n = float(macros["ResBestOfNAtPpoKlN"].value)
    assert abs(math.log(n) - (n - 1) / n - kl) < 0.02 and 2 < n < 4
    assert macros["ResBestOfNMaxN"].value == "16" and macros["ResBestOfNAtPpoKlInside"].value == "yes"
    beyond = {m.name: m for m in paper.best_of_n_macros(results / "best_of_n", 5.0, 0.61)}
    assert beyond["ResBestOfNAtPpoKlGoldMean"].value == "--" and beyond["ResBestOfNAtPpoKlInside"].value == "no"
    text = paper.best_of_n_text(macros | {"ResEvalPpoKlToSft": macros["ResBestOfNMaxN"]})
    assert "fig:bestofn" in text and "GoldGap" in text
    assert set(paper.GENERATED_MACRO_USE.findall(text)) <= set(macros) | {"ResEvalPpoKlToSft", "ResEvalPpoGoldMean"}
    assert paper.best_of_n_text({}) == ""  # without the stage's folder the paper says nothing of it


_BUILD = """
import sys, yaml
from pathlib import Path
from qlora_rlhf.config import Config
from qlora_rlhf.paths import RunPaths
from qlora_rlhf.stages import figures, paper
config = Config.model_validate(yaml.safe_load(Path("params.yaml").read_text()))
paths = RunPaths(Path(sys.argv[1]))
figures.run(config, paths)
paper.run(config, paths)
"""


@pytest.mark.skipif(shutil.which("latexmk") is None, reason="latexmk is not installed")
def test_figures_and_the_pdf_are_the_same_bytes_when_built_again(tmp_path):
    """Two builds from the same results, in other folders (as two clones), in two processes (other
    hash seeds), at other times: every figure (PNG and PDF) and every file of the paper, paper.pdf
    included, is the same to the byte. No creation date, no trailer ID hashed from the build path."""
    pytest.importorskip("seaborn")
    from conftest import scratch_env

    built = []
    for name, hash_seed in (("one", "1"), ("two", "2")):
        run = write_fake_results(tmp_path / name / "run")
        done = subprocess.run([sys.executable, "-c", _BUILD, str(run)], cwd=REPO, capture_output=True, text=True,
                              env=scratch_env() | {"PYTHONHASHSEED": hash_seed}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        built.append({str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
                      if p.is_file() and p.relative_to(run).parts[0] in ("figures", "paper")})
    assert any(name.endswith(".png") for name in built[0]) and "paper/paper.pdf" in built[0]
    assert sorted(built[0]) == sorted(built[1])
    assert [name for name in built[0] if built[0][name] != built[1][name]] == []
