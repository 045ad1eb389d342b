"""Data stage: prompt-disjoint deterministic subsets, malformed rows dropped and counted by reason,
and a clear DataError when the source cannot give what params ask for."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from qlora_rlhf import data, synthetic
from qlora_rlhf.atomic import read_json
from qlora_rlhf.config import load_config
from qlora_rlhf.data import DataError
from qlora_rlhf.hh import parse_row
from qlora_rlhf.paths import RunPaths
from qlora_rlhf.stages import data as data_stage

SUBSETS = {"sft": 32, "rm": 32, "ppo": 16, "eval": 8}  # configs/smoke.yaml


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from qlora_rlhf.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def _unique_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n synthetic rows with distinct prompts (the generator repeats some prompts)."""
    rows, seen = [], set()
    for row in synthetic.generate(20 * n, seed):
        prompt = parse_row(row).prompt
        if prompt not in seen:
            seen.add(prompt)
            rows.append(row)
        if len(rows) == n:
            return rows
    raise AssertionError("not enough distinct synthetic prompts")


def _line(row: object) -> bytes:
    return (json.dumps(row) + "\n").encode()


def _run(write_params, tokenizer=None, **overrides):
    config = load_config(write_params(**overrides))
    paths = RunPaths.of(config)
    return data_stage.write_subsets(config, paths, tokenizer), paths


def _prompts(paths: RunPaths, name: str) -> set[str]:
    return {record["prompt"] for record in data.read_split(paths, name)}


def test_synthetic_subsets_sizes_formats_and_disjoint(write_params):
    manifest, paths = _run(write_params)
    assert {name: info["rows"] for name, info in manifest["subsets"].items()} == SUBSETS
    assert set(manifest["prompt_overlap"].values()) == {0} and len(manifest["prompt_overlap"]) == 6
    assert read_json(paths.manifest) == manifest
    assert manifest["held_out_from"] == "test"
    prompt_sets = {name: _prompts(paths, name) for name in SUBSETS}
    assert {name: len(s) for name, s in prompt_sets.items()} == SUBSETS  # no duplicate prompt inside a subset
    union = set().union(*prompt_sets.values())
    assert len(union) == sum(SUBSETS.values())  # pairwise disjoint, checked on the files themselves
    assert set(data.read_split(paths, "sft")[0]) == {"prompt", "completion"}
    assert set(data.read_split(paths, "rm")[0]) == {"prompt", "chosen", "rejected"}
    assert set(data.read_split(paths, "ppo")[0]) == {"prompt"}
    assert set(data.read_split(paths, "eval")[0]) == {"prompt", "chosen", "rejected"}
    assert not [p for p in paths.data.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_deterministic_for_a_seed(write_params, tmp_path):
    first, _ = _run(write_params, **{"run.results_dir": str(tmp_path / "a")})
    again, _ = _run(write_params, **{"run.results_dir": str(tmp_path / "b")})
    other, _ = _run(write_params, **{"run.results_dir": str(tmp_path / "c"), "run.seed": 99})
    digests = {name: info["sha256"] for name, info in first["subsets"].items()}
    assert digests == {name: info["sha256"] for name, info in again["subsets"].items()}
    assert all(digests[name] != info["sha256"] for name, info in other["subsets"].items())


def test_sizes_as_asked(write_params):
    manifest, paths = _run(write_params, **{"data.sft_size": 10, "data.rm_size": 20, "data.ppo_size": 5,
                                            "data.eval_size": 7, "sft.batch_size": 2, "rm.batch_size": 2,
                                            "ppo.batch_size": 4, "eval.num_prompts": 7})
    assert {n: i["rows"] for n, i in manifest["subsets"].items()} == {"sft": 10, "rm": 20, "ppo": 5, "eval": 7}
    assert len(data.read_split(paths, "rm")) == 20


def _write_hh_dir(root: Path) -> tuple[Path, int]:
    """train.jsonl: 120 good rows and one or more malformed rows of each kind; test.jsonl.gz cut in half."""
    rows = _unique_rows(180)
    good, test_rows = rows[:120], rows[120:]
    p = "\n\nHuman: What is 2 plus 2?\n\nAssistant:"
    bad = [
        _line({"chosen": p + " 4."}), _line({"text": "x"}),  # missing_keys x2
        _line({"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi you"}),  # no_assistant_turn
        _line({"chosen": p, "rejected": p + " 5."}),  # empty_response
        _line({"chosen": p + " 4.", "rejected": p + " 4."}),  # chosen_equals_rejected
        b'{"chosen": "\\n\\nHuman: hi\n', b"not json at all\n",  # broken_json x2
        b'{"chosen": "\xff\xfe bad bytes", "rejected": "x"}\n',  # undecodable_text (raw invalid utf-8)
        _line({"chosen": p + " 4\ufffd", "rejected": p + " 5."}),  # undecodable_text (replacement char)
        _line({"chosen": good[0]["chosen"] + " Really.", "rejected": good[0]["rejected"] + " No."}),  # duplicate_prompt
        _line({"chosen": good[1]["chosen"], "rejected": good[1]["rejected"] + "!"}),  # duplicate_prompt
        _line({"chosen": "\n\nHuman: " + "word " * 300 + "\n\nAssistant: ok.",
               "rejected": "\n\nHuman: " + "word " * 300 + "\n\nAssistant: no."}),  # too_long
        b"\n", b"   \n",  # blank lines are not rows
    ]
    folder = root / "hh"
    folder.mkdir()
    lines = [_line(r) for r in good]
    for i, row in enumerate(bad):  # spread the bad rows among the good ones
        lines.insert(10 * i + 5, row)
    (folder / "train.jsonl").write_bytes(b"".join(lines))
    whole = gzip.compress(b"".join(_line(r) for r in test_rows))
    (folder / "test.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    return folder, len(test_rows)


def test_hh_directory_with_malformed_rows(write_params, tokenizer, tmp_path):
    folder, n_test = _write_hh_dir(tmp_path)
    manifest, paths = _run(write_params, tokenizer, **{"data.source": str(folder)})
    assert manifest["dropped"]["train"] == {
        "broken_json": 2, "chosen_equals_rejected": 1, "duplicate_prompt": 2, "empty_response": 1,
        "missing_keys": 2, "no_assistant_turn": 1, "too_long": 1, "undecodable_text": 2}
    assert manifest["rows_usable"]["train"] == 120
    assert manifest["rows_read"]["train"] == 120 + 13
    assert manifest["dropped"]["test"].get("truncated_file") == 1
    assert 8 <= manifest["rows_usable"]["test"] < n_test  # rows before the cut are kept
    assert manifest["held_out_from"] == "test"
    assert set(manifest["prompt_overlap"].values()) == {0}
    assert {name: info["rows"] for name, info in manifest["subsets"].items()} == SUBSETS
    eval_prompts = _prompts(paths, "eval")
    assert not eval_prompts & (_prompts(paths, "sft") | _prompts(paths, "rm") | _prompts(paths, "ppo"))


def test_too_long_needs_the_tokenizer(write_params, tmp_path):
    folder, _ = _write_hh_dir(tmp_path)
    manifest, _ = _run(write_params, None, **{"data.source": str(folder)})
    assert "too_long" not in manifest["dropped"]["train"]


def test_small_max_length_drops_long_rows(write_params, tokenizer, tmp_path):
    rows = _unique_rows(300)
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"".join(_line(r) for r in rows))

    def fits(row) -> bool:
        pair = parse_row(row)
        n = [len(tokenizer(t).input_ids) for t in (pair.prompt, row["chosen"], row["rejected"])]
        return n[0] <= 48 and max(n[1:]) + 1 <= 64

    expected = sum(map(fits, rows))
    assert 88 <= expected < 300  # the limits bite, and enough rows are left for the subsets
    manifest, paths = _run(write_params, tokenizer, **{"data.source": str(path), "data.max_prompt_tokens": 48,
                                                       "data.max_length": 64})
    assert manifest["dropped"]["train"] == {"too_long": 300 - expected}
    for record in data.read_split(paths, "sft"):
        assert len(tokenizer(record["prompt"]).input_ids) <= 48
        assert len(tokenizer(record["prompt"] + record["completion"]).input_ids) + 1 <= 64


def test_single_jsonl_file_source_holds_out_eval_from_train(write_params, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"".join(_line(r) for r in _unique_rows(100)))
    manifest, paths = _run(write_params, **{"data.source": str(path)})
    assert manifest["held_out_from"] == "train" and "test" not in manifest["rows_usable"]
    assert set(manifest["prompt_overlap"].values()) == {0}
    assert len(_prompts(paths, "eval")) == 8
    assert not _prompts(paths, "eval") & (_prompts(paths, "sft") | _prompts(paths, "rm") | _prompts(paths, "ppo"))


def test_directory_without_test_split(write_params, tmp_path):
    folder = tmp_path / "only-train"
    folder.mkdir()
    with gzip.open(folder / "train.jsonl.gz", "wb") as handle:
        handle.write(b"".join(_line(r) for r in _unique_rows(100)))
    manifest, _ = _run(write_params, **{"data.source": str(folder)})
    assert manifest["held_out_from"] == "train" and manifest["rows_usable"] == {"train": 100}


def test_too_few_rows_for_the_sizes(write_params, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"".join(_line(r) for r in _unique_rows(50)))
    with pytest.raises(DataError, match=r"50 usable training prompts .* = 88"):
        _run(write_params, **{"data.source": str(path)})


def test_empty_file(write_params, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="no usable training row .*no rows at all"):
        _run(write_params, **{"data.source": str(path)})


def test_file_where_no_row_survives(write_params, tmp_path):
    path = tmp_path / "bad.jsonl"
    p = "\n\nHuman: hi\n\nAssistant:"
    path.write_bytes(_line({"chosen": p + " a", "rejected": p + " a"}) + b"{oops\n" + _line({"chosen": p}))
    with pytest.raises(DataError) as info:
        _run(write_params, **{"data.source": str(path)})
    message = str(info.value)
    assert "no usable training row" in message and str(path) in message
    for reason in ("broken_json=1", "chosen_equals_rejected=1", "missing_keys=1"):
        assert reason in message


def test_file_of_duplicates(write_params, tmp_path):
    row = _unique_rows(1)[0]
    path = tmp_path / "dups.jsonl"
    path.write_bytes(_line(row) * 200)
    with pytest.raises(DataError, match="has 1 usable training prompts"):
        _run(write_params, **{"data.source": str(path)})


def test_missing_source(write_params, tmp_path):
    with pytest.raises(DataError, match="data.source: not found"):
        _run(write_params, **{"data.source": str(tmp_path / "nowhere.jsonl")})


def test_unreadable_path_is_a_data_error(write_params, tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "train.jsonl").mkdir()  # a folder named like a data file
    with pytest.raises(DataError, match="cannot read data file"):
        _run(write_params, **{"data.source": str(folder)})


def test_failed_run_keeps_previous_output(write_params, tmp_path):
    manifest, paths = _run(write_params)
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError):
        _run(write_params, **{"data.source": str(path)})
    assert read_json(paths.manifest) == manifest


# ------------------------------------------------------------------ atomic outputs (every stage writes through these)
import errno  # noqa: E402
import os  # noqa: E402

from qlora_rlhf.atomic import SaveError, atomic_dir, atomic_file, write_json  # noqa: E402


def _previous(tmp_path) -> Path:
    target = tmp_path / "out"
    with atomic_dir(target) as out:
        (out / "result.txt").write_text("previous")
    return target


def _leftovers(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


def test_atomic_dir_replaces_the_whole_folder(tmp_path):
    target = _previous(tmp_path)
    with atomic_dir(target) as out:
        assert out != target and out.parent == target.parent
        (out / "new.txt").write_text("new")
        assert (target / "result.txt").read_text() == "previous"  # untouched until the body ends
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_body_raises_keeps_previous(tmp_path, error):
    target = _previous(tmp_path)
    with pytest.raises(type(error)):
        with atomic_dir(target) as out:
            (out / "result.txt").write_text("half")
            raise error
    assert (target / "result.txt").read_text() == "previous"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_disk_full_in_body(tmp_path):
    target = _previous(tmp_path)
    with pytest.raises(SaveError, match="could not write .*out.*left as it was"):
        with atomic_dir(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "result.txt").read_text() == "previous"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("failing", ["first", "last"])
def test_atomic_dir_rename_fails_keeps_previous(tmp_path, monkeypatch, failing):
    """A full disk (or any OSError) while swapping the folders: SaveError, the previous output stays."""
    target = _previous(tmp_path)
    real_rename = Path.rename

    def rename(self, dest):
        # "first": moving the previous output aside; "last": moving the new folder into place
        if (failing == "first" and self == target) or (failing == "last" and self.name.startswith(".out.tmp-")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(SaveError) as info:
        with atomic_dir(target) as out:
            (out / "result.txt").write_text("new")
    assert info.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    assert (target / "result.txt").read_text() == "previous"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_recovers_a_run_killed_between_renames(tmp_path):
    target = _previous(tmp_path)
    target.rename(tmp_path / ".out.old")  # what a kill between the two renames leaves
    with pytest.raises(RuntimeError):
        with atomic_dir(target):
            raise RuntimeError("this run fails too")
    assert (target / "result.txt").read_text() == "previous"
    assert _leftovers(tmp_path) == []


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        target = _previous(tmp_path)
        write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(old_umask)
    assert target.stat().st_mode & 0o777 == 0o755  # mkdtemp alone would give 0700
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone would give 0600


def test_atomic_file_replace_fails_keeps_previous(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"reward": 1.0})

    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SaveError, match="metrics.json"):
        write_json(target, {"reward": 2.0})
    monkeypatch.undo()
    assert read_json(target) == {"reward": 1.0}
    assert _leftovers(tmp_path) == []


def test_atomic_file_body_raises_keeps_previous(tmp_path):
    target = tmp_path / "table.csv"
    with atomic_file(target) as handle:
        handle.write("a,b\n1,2\n")
    with pytest.raises(ValueError):
        with atomic_file(target) as handle:
            handle.write("half")
            raise ValueError("bad row")
    assert target.read_text() == "a,b\n1,2\n"
    assert _leftovers(tmp_path) == []


def test_a_missing_split_names_the_data_stage(tmp_path):
    with pytest.raises(DataError, match="eval.jsonl is missing: run the data stage first"):
        data.read_split(RunPaths(tmp_path / "run"), "eval")
